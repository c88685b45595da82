"""
Throughput of the batched ensemble: does an ensemble of M LoRA adapters cost what its
arithmetic costs? A script, not a test; it prints one table.

    flock /tmp/cpu.lock python -m experiments.throughput          # the lock keeps other jobs off the cores while timing
    python -m experiments.throughput --n_threads=1 --profile=True # one thread; and the top ops of the ensemble step
    python -m experiments.throughput --device=cuda --preset=gpt2 --dtype=bfloat16 --compile=true   # one GPU

Training steps (forward, α-Rényi loss, backward, AdamW), each the median of n_timed steps after
n_warmup, at the default SFT size (pretrain.py's base, the benchmark's batches of 32 examples of
about 27 tokens), with the member-tokens (M*B*T) they train on per second:
  (a) the M-member ensemble on a batch of B            (one pass, member axis)
  (b) one adapter on a batch of M*B                    (the same arithmetic, no member axis)
  (c) a Python loop over M one-adapter models, batch B (what a per-adapter loop does)
  (d) torch.func.stack_module_state + vmap over those M models
then decoding (M members together vs one after another; the KV cache on vs off, for the
sequence mixture and for every member's own continuation), the shared frozen trunk
(adapters on the top half, sharing on vs off) and the MFU of (a): its matmul FLOPs (torch's
FlopCounterMode) per second over a peak: a matmul timed here on CPU, CARD_PEAKS on CUDA, or --peak_flops.
--dtype is train_sft.py's (trainer.set_precision); --compile=true adds (a)-(c) with the forward
torch.compile'd, as train_loop compiles it, timed in turns with the eager ones. On CUDA a time waits for the GPU.

    OMP_NUM_THREADS=1 python -m experiments.throughput --preset=gpt2   # GPT-2 small's shape: the memory table below

--memory=true (on with --preset=gpt2; on CPU instead of the table above, on CUDA after it) times M = 1, 2, 4,
8 members on one frozen base against M copies of the model (a base and an adapter each), each member on a batch
B, in fresh processes. A peak is the process's maximum resident set (ru_maxrss: torch allocates outside Python's
allocator, so tracemalloc would miss it), on CUDA torch.cuda.max_memory_allocated. A member should add its
adapters with their gradients and AdamW's two moments (4 x 4 bytes a parameter), the activations its forward
saves for backward (counted with autograd's saved-tensor hooks) and the logits-sized gradients backward holds.
"""
import copy
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from config import UserError, check_device, parse_args, run_script, torch_dtype
from lora import add_lora, merge_member
from model import GPT, GPTConfig
from renyi_lora import renyi_loss, sequence_logprobs
from trainer import set_precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository, where -m finds this module

defaults = dict(
    # the size of pretrain.py's base, with random weights: speed does not depend on their values
    n_layer=4,
    n_head=4,
    n_embd=128,
    vocab_size=1024,                        # renyi-bpe's vocabulary
    n_members=4,
    lora_rank=8,
    batch_size=32,                          # train_sft.py's default
    seq_len=27,                             # the length of a padded benchmark SFT batch
    prompt_len=14,                          # tokens without a label (the benchmark's mean prompt)
    new_tokens=32,                          # decoding benchmark: tokens generated per member
    cache_prompt_len=32,                    # KV-cache benchmark: a prompt of this many tokens ...
    cache_new_tokens=96,                    # ... continued by this many, with and without the cache
    n_warmup=3,
    n_timed=20,
    n_threads=0,                            # 0: torch's default (one per physical core)
    profile=False,                          # print torch.profiler's top ops of the ensemble step
    seed=0,
    preset='',                              # 'gpt2': the PRESETS entry's values replace the defaults above
    block_size=128,                         # the position table's length (GPT-2: 1024)
    memory=False,                           # the memory table instead: M members on one base vs M copies
    memory_members='1,2,4,8',               # ... for these M
    memory_run='',                          # (internal) one configuration of it, 'ensemble:M' or 'copies:M'
    device='cuda' if torch.cuda.is_available() else 'cpu',
    dtype='auto',                           # train_sft.py's: float32, bfloat16, float16; auto: bfloat16 on CUDA
    compile=False,                          # also time (a)-(c) with the forward torch.compile'd
    peak_flops=0.0,                         # the MFU's peak FLOP/s; 0: CARD_PEAKS on CUDA, a matmul timed on CPU
)
PRESETS = dict(
    # GPT-2 small (124M parameters) with random weights, kept small enough in batch and steps for a CPU
    gpt2=dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, batch_size=2, seq_len=64,
              prompt_len=16, n_warmup=1, n_timed=3, memory=True),
)
CUDA_PRESETS = dict(gpt2=dict(batch_size=4, seq_len=256, prompt_len=64, n_warmup=3, n_timed=10))  # and on CUDA
# Dense (no sparsity) 16-bit tensor-core FLOP/s by a word of the CUDA device's name, the first match winning: bfloat16
# or float16 with float32 accumulation, as torch multiplies (V100, T4: float16, having no bfloat16). Sparse datasheet
# figures halved: H100 SXM 1,979 and PCIe 1,513 TFLOPS (H100 datasheet; other H100s are slower, so their MFU reads
# low), L4 242 (L4 datasheet). Dense: A100 312, A10 125 (datasheets; AWS's A10G taken at the A10's, as in Lightning's
# table), RTX 4090 165.2 (Ada whitepaper), RTX 3090 71 (GA102 whitepaper), V100 SXM2 125, PCIe 112, T4 65 (datasheets).
CARD_PEAKS = (('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12), ('A10G?', 125e12), ('L4', 121e12),
              ('RTX 4090', 165e12), ('RTX 3090', 71e12), ('V100-PCIE', 112e12), ('V100', 125e12), ('T4', 65e12))


def card_peak(device_name):
    """The CARD_PEAKS FLOP/s of the CUDA device called device_name, or None for a card not listed."""
    return next((peak for card, peak in CARD_PEAKS if re.search(rf"\b{card}\b", device_name, re.IGNORECASE)), None)


def mfu(flops, seconds, peak):
    """Model FLOPs utilisation of a step of `flops` matmul FLOPs taking `seconds`; None without a peak."""
    return flops / seconds / peak if peak else None


def timings(fns, config, summary=statistics.median):
    """{name: summary (the median) of the seconds of n_timed calls} for a dict of closures, after n_warmup rounds.

    The closures take turns, so a change in the machine's load during the run hits them all alike.
    On CUDA a time waits for the device, whose kernels run asynchronously.
    """
    sync = torch.cuda.synchronize if torch.device(config['device']).type == 'cuda' else (lambda: None)
    for fn in [*fns.values()] * config['n_warmup']:
        fn()
    times = {name: [] for name in fns}
    for _ in range(config['n_timed']):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: summary(seconds) for name, seconds in times.items()}


def peak_flops(config, dtype, n=1024):
    """The MFU's peak FLOP/s: --peak_flops when given; on CUDA the card's in CARD_PEAKS for a 16-bit dtype (None for
    float32 or a card not listed); on CPU the fastest of n_timed (n, n) @ (n, n) matmuls in dtype, timed here."""
    if config['peak_flops'] > 0:
        return config['peak_flops']
    if torch.device(config['device']).type == 'cuda':
        return card_peak(torch.cuda.get_device_name(config['device'])) if dtype != torch.float32 else None
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / timings(dict(matmul=lambda: a @ b), config, min)['matmul']


def ensemble(config, n_members, layers=None):
    """A GPT of the configured size carrying n_members adapters (on `layers`, all blocks by default), on the
    configured device, its frozen base in the configured dtype."""
    model = GPT(GPTConfig(block_size=config['block_size'], vocab_size=config['vocab_size'], n_layer=config['n_layer'],
                          n_head=config['n_head'], n_embd=config['n_embd']))
    add_lora(model, n_members, config['lora_rank'], lora_alpha=2.0 * config['lora_rank'], layers=layers)
    return set_precision(model, config).to(config['device'])


def batch(config):
    """A random batch idx (B, T) on the configured device and its labels (B, T), the first prompt_len tokens -100."""
    idx = torch.randint(config['vocab_size'], (config['batch_size'], config['seq_len']), device=config['device'])
    return idx, idx.masked_fill(torch.arange(config['seq_len'], device=config['device']) < config['prompt_len'], -100)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def loss_of(logits, labels):
    """The α-Rényi loss (alpha = 1) of logits (M, B, T, V): the objective every variant trains."""
    return renyi_loss(sequence_logprobs(logits, labels), alpha=1.0)


def training_step(loss_fn, params):
    """A closure running one step of AdamW on params for the scalar loss_fn()."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
    return step


def step_variants(config, idx, labels):
    """(the ensemble, {name: a training-step closure}) for the ways of training M adapters on one batch; with
    --compile also 'a compiled', 'b compiled' and 'c compiled', the same steps through torch.compile'd models."""
    n_members = config['n_members']
    batched, single = ensemble(config, n_members), ensemble(config, 1)
    wide_idx, wide_labels = idx.repeat(n_members, 1), labels.repeat(n_members, 1)     # (M*B, T)
    loops = [copy.deepcopy(single) for _ in range(n_members)]

    def abc(batched_fn, single_fn, loop_fns):
        return dict(a=training_step(lambda: loss_of(batched_fn(idx), labels), trainable(batched)),
                    b=training_step(lambda: loss_of(single_fn(wide_idx), wide_labels), trainable(single)),
                    c=training_step(lambda: loss_of(torch.cat([m(idx) for m in loop_fns]), labels),
                                    [p for m in loops for p in trainable(m)]))
    steps = abc(batched, single, loops)
    params, buffers = torch.func.stack_module_state(loops)       # every tensor gains a leading (M,) axis
    forward = lambda p, b: torch.func.functional_call(single, (p, b), (idx,))            # (1, B, T, V)
    steps['d'] = training_step(lambda: loss_of(torch.vmap(forward)(params, buffers)[:, 0], labels),
                               [p for p in params.values() if p.requires_grad])
    if config['compile']:
        compiled = abc(torch.compile(batched), torch.compile(single), [torch.compile(m) for m in loops])
        steps |= {f"{name} compiled": step for name, step in compiled.items()}
    return batched, steps


def step_flops(model, idx, labels):
    """Matmul FLOPs of one forward and backward of model on idx, as torch counts them."""
    with FlopCounterMode(display=False) as counter:
        loss_of(model(idx), labels).backward()
    return counter.get_total_flops()


def decode_seconds(config, model, dtype):
    """Seconds to decode greedily: new_tokens after a prompt_len prompt, {'together': the members in one pass, 'apart':
    one merged plain GPT after another}; cache_new_tokens after a cache_prompt_len one, {(mixture, use_cache): s}."""
    prompt, long_prompt = (torch.randint(config['vocab_size'], (1, config[key]), device=config['device'])
                           for key in ('prompt_len', 'cache_prompt_len'))
    members = [merge_member(model, m).requires_grad_(False).set_dtype(dtype) for m in range(config['n_members'])]
    runs = {(mixture, use_cache): (lambda mixture=mixture, use_cache=use_cache: model.generate(
                long_prompt, config['cache_new_tokens'], temperature=0, mixture=mixture, use_cache=use_cache))
            for mixture in ('sequence', None) for use_cache in (True, False)}
    times = timings(dict(
        together=lambda: model.generate(prompt, config['new_tokens'], temperature=0),
        apart=lambda: [member.generate(prompt, config['new_tokens'], temperature=0) for member in members]), config)
    return times | timings(runs, config | dict(n_timed=max(1, config['n_timed'] // 4)))


def trunk_seconds(config, idx, labels):
    """Adapters on the top half: (step with the trunk shared, step without, forward of the frozen half for M members)."""
    n_layer, n_members = config['n_layer'], config['n_members']
    model = ensemble(config, n_members, layers=range(n_layer // 2, n_layer))
    step = training_step(lambda: loss_of(model(idx), labels), trainable(model))

    def step_sharing(share_trunk):
        model.share_trunk = share_trunk
        step()

    with torch.no_grad():
        embedded = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1], device=idx.device))
        embedded = embedded.expand(n_members, *embedded.shape)                        # (B, T, C) -> (M, B, T, C)

    @torch.no_grad()
    def frozen_half():
        x = embedded
        with torch.autocast(idx.device.type, model.autocast_dtype, enabled=model.autocast_dtype is not None):
            for block in model.transformer.h[:n_layer // 2]:
                x = block(x)
    times = timings(dict(shared=lambda: step_sharing(True), unshared=lambda: step_sharing(False),
                         frozen=frozen_half), config)
    return times['shared'], times['unshared'], times['frozen']


def saved_for_backward_mb(loss_fn):
    """MB of the tensors autograd saves in one forward pass of loss_fn (each storage once; the frozen weights,
    which autograd saves too, are not activations and are left out)."""
    storages = {}

    def pack(tensor):
        if not (isinstance(tensor, torch.nn.Parameter) or tensor._base is not None and
                isinstance(tensor._base, torch.nn.Parameter)):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return sum(storages.values()) / 2 ** 20


def memory_run(config):
    """One configuration of the memory table, in this fresh process: {ms per step, peak MB once the models are built
    and over the timed steps (resident, or allocated on CUDA), MB saved for backward, adapter parameters per member}."""
    kind, n_members = config['memory_run'].split(':')
    n_members, device = int(n_members), config['device']
    peak_mb = lambda: (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.startswith('cuda') else
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)    # Linux's ru_maxrss is in KB
    idx, labels = batch(config)
    models = [ensemble(config, n_members)] if kind == 'ensemble' else [ensemble(config, 1) for _ in range(n_members)]
    steps = [training_step(lambda model=model: loss_of(model(idx), labels), trainable(model)) for model in models]
    built = peak_mb()
    seconds = timings(dict(step=lambda: [step() for step in steps]), config)['step']
    peak = peak_mb()
    saved = sum(saved_for_backward_mb(lambda model=model: loss_of(model(idx), labels)) for model in models)
    return dict(ms=seconds * 1e3, built_mb=built, peak_mb=peak, saved_mb=saved,
                adapter_params=sum(p.numel() for model in models for p in trainable(model)) // n_members)


def memory_table(config):
    """Step time and peak memory of M members on one base against M separate copies, each in a fresh process."""
    args = [f"--{key}={value}" for key, value in config.items() if key not in ('preset', 'memory_run')]
    runs, members = {}, sorted(int(m) for m in config['memory_members'].split(','))
    for n_members in members:
        for kind in ('ensemble', 'copies'):
            result = subprocess.run([sys.executable, '-m', 'experiments.throughput', *args,  # from the repository root
                                     f"--memory_run={kind}:{n_members}"], capture_output=True, text=True, check=True,
                                    cwd=ROOT)
            runs[kind, n_members] = json.loads(result.stdout.splitlines()[-1])
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {config['device']}, base in "
          f"{config['dtype']}; {config['n_layer']} layers, n_embd {config['n_embd']}, vocab {config['vocab_size']}, "
          f"random weights; rank-{config['lora_rank']} adapters on every block; per member B={config['batch_size']} x "
          f"T={config['seq_len']} tokens; median of {config['n_timed']} steps after {config['n_warmup']}")
    print(f"{'M':>3} {'ms/step one base':>17} {'ms/step M copies':>17} {'peak MB one base':>17} {'peak MB M copies':>17}"
          f" {'built MB one base':>18} {'saved for bwd MB':>17}")
    for m in members:
        one, copies = runs['ensemble', m], runs['copies', m]
        print(f"{m:>3} {one['ms']:>17.0f} {copies['ms']:>17.0f} {one['peak_mb']:>17.0f} {copies['peak_mb']:>17.0f}"
              f" {one['built_mb']:>18.0f} {one['saved_mb']:>17.1f}")
    first, last = members[0], members[-1]
    per_member = {kind: (runs[kind, last]['peak_mb'] - runs[kind, first]['peak_mb']) / (last - first)
                  for kind in ('ensemble', 'copies')}
    one = runs['ensemble', last]
    adapters_mb = one['adapter_params'] * 4 * 4 / 2 ** 20      # parameters, gradients, AdamW's two moments; fp32
    activations_mb = (one['saved_mb'] - runs['ensemble', first]['saved_mb']) / (last - first)
    logits_mb = config['batch_size'] * config['seq_len'] * config['vocab_size'] * 4 / 2 ** 20
    print(f"\nextra peak memory per member, M = {first} -> {last}: one base {per_member['ensemble']:.0f} MB, "
          f"M copies {per_member['copies']:.0f} MB")
    print(f"a member's accounting: adapters {one['adapter_params'] / 1e6:.2f}M parameters x 16 bytes (with gradients "
          f"and AdamW's moments) = {adapters_mb:.0f} MB, activations saved for backward {activations_mb:.0f} MB, and "
          f"the backward's three transient logits-sized gradients (of the log-softmax, of the shifted slice and of the "
          f"logits: B x T x V fp32 = {logits_mb:.0f} MB each): {adapters_mb + activations_mb + 3 * logits_mb:.0f} MB")
    print(f"the base's weights, paid once by the ensemble and M times by the copies: "
          f"{runs['copies', last]['built_mb'] - runs['copies', first]['built_mb']:.0f} MB for {last - first} more copies")


def row(label, seconds, rest=''):
    print(f"{label:<46}{seconds * 1e3:9.1f}  {rest}".rstrip())


def main(argv):
    config = parse_args(defaults, argv)
    if config['preset'] not in ('', *PRESETS):
        raise UserError(f"--preset={config['preset']}: expected '' or one of {', '.join(PRESETS)}")
    if torch.device(check_device(config['device'])).type not in ('cpu', 'cuda'):
        raise UserError(f"--device={config['device']}: this script times cpu or cuda")
    cuda = config['device'].startswith('cuda')
    device_name = torch.cuda.get_device_name(config['device']) if cuda else 'CPU'
    preset = PRESETS.get(config['preset'], {}) | (CUDA_PRESETS.get(config['preset'], {}) if cuda else {})
    config = parse_args(defaults | preset, argv)
    dtype, n_members = torch_dtype(config['dtype'], config['device']), config['n_members']
    config['dtype'] = str(dtype).removeprefix('torch.')           # 'auto' resolved, for the memory table's processes
    if config['n_threads']:
        torch.set_num_threads(config['n_threads'])
    torch.manual_seed(config['seed'])
    if config['memory_run']:
        return print(json.dumps(memory_run(config)))
    if config['memory'] and not cuda:
        return memory_table(config)
    load_before = os.getloadavg()
    idx, labels = batch(config)                                                                    # (B, T) each
    peak = peak_flops(config, dtype)
    batched, steps = step_variants(config, idx, labels)
    for name in [name for name in steps if name not in ('a', 'b', 'c')]:
        try:
            steps[name]()
        except Exception as error:  # torch.func may not cover every op, torch.compile may find no compiler
            print(f"({name}) does not run: {type(error).__name__}: {str(error).splitlines()[0]}")
            del steps[name]
    times = timings(steps, config)
    flops = step_flops(batched, idx, labels)
    decoding = decode_seconds(config, batched, dtype)
    shared, unshared, frozen = trunk_seconds(config, idx, labels)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; {device_name}")
    print(f"model: {config['n_layer']} layers, n_embd {config['n_embd']}, vocab {config['vocab_size']}, base in "
          f"{dtype}; M={n_members} adapters of rank {config['lora_rank']}; batch B={idx.shape[0]} x T={idx.shape[1]}")
    source = '--peak_flops' if config['peak_flops'] > 0 else 'CARD_PEAKS' if cuda else f"{dtype} 1024^3 matmul"
    print(f"peak for the MFU: {f'{peak / 1e9:,.1f} GFLOP/s' if peak else 'unknown'} ({source})\n")
    print(f"{'training step (fwd + bwd + AdamW)':<46}{'ms':>9}  {'tokens/s':>8}  ratio")
    labels_of = dict(a=f"(a) ensemble, M={n_members} on B", b=f"(b) one adapter on {n_members}*B",
                     c=f"(c) loop over {n_members} adapters, B each", d="(d) torch.func stack_module_state + vmap")
    for name, seconds in times.items():
        reference = name[0] if name.endswith('compiled') else 'a'   # compiled against eager, the others against (a)
        row(labels_of[name[0]] + name[1:], seconds, f"{idx.numel() * n_members / seconds:8.0f}"
            + (name != 'a') * f"  ({reference})/({name}) = {times[reference] / seconds:.2f}")
    for name in [name for name in times if name[0] == 'a']:
        print(f"{f'MFU of ({name})':<46}{'':>9}  {flops / times[name] / 1e9:,.1f} GFLOP/s = "
              f"{f'{mfu(flops, times[name], peak):.0%}' if peak else '–'} of peak ({flops / 1e9:.2f} GFLOP per step)")
    if not peak:
        print(f"no peak for {device_name} in {dtype}: pass --peak_flops=<its dense FLOP/s>")
    together, apart, new = decoding['together'], decoding['apart'], n_members * config['new_tokens']
    print(f"\n{'decoding ' + str(config['new_tokens']) + ' tokens from one prompt':<46}{'ms':>9}  tokens/s")
    row(f"{n_members} members together", together, f"{new / together:.0f}")
    row(f"{n_members} members one after another", apart, f"{new / apart:.0f}   together/apart speed-up "
        f"{apart / together:.2f}")
    print(f"\n{'decoding ' + str(config['cache_new_tokens']) + ' tokens after ' + str(config['cache_prompt_len']):<46}"
          f"{'ms':>9}  tokens/s")
    for mixture in ('sequence', None):
        for use_cache in (True, False):
            row(f"mixture={mixture}, {'KV cache' if use_cache else 'no cache'}", decoding[mixture, use_cache],
                f"{config['cache_new_tokens'] * (1 if mixture else n_members) / decoding[mixture, use_cache]:.0f}"
                + use_cache * f"   cache speed-up {decoding[mixture, False] / decoding[mixture, True]:.2f}")
    saved, ideal = unshared - shared, frozen * (n_members - 1) / n_members
    top_half = f"adapters on blocks {config['n_layer'] // 2}..{config['n_layer'] - 1} (step)"
    print(f"\n{top_half:<46}{'ms':>9}")
    row('trunk shared', shared)
    row('trunk not shared', unshared, f"saved {saved * 1e3:.1f} ms")
    row(f"frozen half, forward for {n_members} members", frozen,
        f"ideal saving (M-1)/M of it = {ideal * 1e3:.1f} ms; saved/ideal = {saved / ideal:.2f}")
    if config['profile']:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            for _ in range(3):
                steps['a']()
        print("\nprofile of (a), 3 steps:\n" + profile.key_averages().table('self_cpu_time_total', row_limit=12))
    if config['memory']:   # on CUDA, after the table above
        memory_table(config)


if __name__ == '__main__':
    run_script(main)
