"""
Throughput of the batched ensemble: does an ensemble of M LoRA adapters cost what its
arithmetic costs? A script, not a test; it prints one table.

    flock /tmp/cpu.lock python -m experiments.throughput          # the lock keeps other jobs off the cores while timing
    python -m experiments.throughput --n_threads=1 --profile=True # one thread; and the top ops of the ensemble step

Training steps (forward, α-Rényi loss, backward, AdamW), each the median of n_timed
steps after n_warmup, at the default SFT size (pretrain.py's base, the benchmark's
batches of 32 examples of about 27 tokens):
  (a) the M-member ensemble on a batch of B            (one pass, member axis)
  (b) one adapter on a batch of M*B                    (the same arithmetic, no member axis)
  (c) a Python loop over M one-adapter models, batch B (what a per-adapter loop does)
  (d) torch.func.stack_module_state + vmap over those M models
then decoding (M members together vs one after another; the KV cache on vs off, for the
sequence mixture and for every member's own continuation), the shared frozen trunk
(adapters on the top half, sharing on vs off) and the MFU of (a): the step's matmul
FLOPs (counted by torch's FlopCounterMode) per second over a matmul peak measured here.

    OMP_NUM_THREADS=1 python -m experiments.throughput --preset=gpt2   # GPT-2 small's shape: the memory table below

--memory=true (on with --preset=gpt2) prints instead the step time and peak memory of M = 1, 2, 4,
8 members on one frozen base against M separate copies of the model (base and one adapter each),
every member on the same per-member batch B. Each configuration runs in a fresh process and its
peak is the process's maximum resident set (getrusage's ru_maxrss): torch allocates outside
Python's allocator, so tracemalloc would not see it. The expected extra memory of a member is
its adapters with their gradients and AdamW's two moments (4 x 4 bytes per adapter parameter)
plus the activations its forward pass saves for the backward one (counted with autograd's
saved-tensor hooks) plus the logits-sized gradients its backward pass holds for a moment.
"""
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from config import UserError, parse_args, run_script
from lora import add_lora, merge_member
from model import GPT, GPTConfig
from renyi_lora import renyi_loss, sequence_logprobs

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
)
PRESETS = dict(
    # GPT-2 small (124M parameters) with random weights, kept small enough in batch and steps for a CPU
    gpt2=dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, batch_size=2, seq_len=64,
              prompt_len=16, n_warmup=1, n_timed=3, memory=True),
)


def timings(fns, n_warmup, n_timed):
    """{name: [seconds of each of n_timed calls]} for a dict of closures, after n_warmup untimed rounds.

    The closures take turns, so a change in the machine's load during the run hits them all alike.
    """
    for _ in range(n_warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(n_timed):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_seconds(fns, config):
    """{name: median seconds of a call} for a dict of closures, timed in turns."""
    return {name: statistics.median(t) for name, t in timings(fns, config['n_warmup'], config['n_timed']).items()}


def matmul_peak(config, n=1024):
    """FLOP/s of the fastest of n_timed (n, n) @ (n, n) fp32 matmuls on this machine: the ceiling for the MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / min(timings(dict(matmul=lambda: a @ b), config['n_warmup'], config['n_timed'])['matmul'])


def ensemble(config, n_members, layers=None):
    """A GPT of the configured size carrying n_members adapters (on `layers`, all blocks by default)."""
    model = GPT(GPTConfig(block_size=config['block_size'], vocab_size=config['vocab_size'], n_layer=config['n_layer'],
                          n_head=config['n_head'], n_embd=config['n_embd']))
    add_lora(model, n_members, config['lora_rank'], lora_alpha=2.0 * config['lora_rank'], layers=layers)
    return model


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
    """{name: a training-step closure} for the four ways of training M adapters on one batch."""
    n_members = config['n_members']
    batched = ensemble(config, n_members)
    single = ensemble(config, 1)
    wide_idx, wide_labels = idx.repeat(n_members, 1), labels.repeat(n_members, 1)     # (M*B, T)
    loops = [copy.deepcopy(single) for _ in range(n_members)]
    loop_params = [p for m in loops for p in m.parameters() if p.requires_grad]

    steps = {
        'a': training_step(lambda: loss_of(batched(idx), labels),
                           [p for p in batched.parameters() if p.requires_grad]),
        'b': training_step(lambda: loss_of(single(wide_idx), wide_labels),
                           [p for p in single.parameters() if p.requires_grad]),
        'c': training_step(lambda: loss_of(torch.cat([m(idx) for m in loops]), labels), loop_params),
    }
    params, buffers = torch.func.stack_module_state(loops)       # every tensor gains a leading (M,) axis
    forward = lambda p, b: torch.func.functional_call(single, (p, b), (idx,))            # (1, B, T, V)
    steps['d'] = training_step(lambda: loss_of(torch.vmap(forward)(params, buffers)[:, 0], labels),
                               [p for p in params.values() if p.requires_grad])
    return batched, steps


def step_flops(model, idx, labels):
    """Matmul FLOPs of one forward and backward of model on idx, as torch counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss_of(model(idx), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def decode_seconds(config, model):
    """Seconds to decode new_tokens greedily from one prompt: (all members together, one member after another)."""
    prompt = torch.randint(config['vocab_size'], (1, config['prompt_len']))
    members = [merge_member(model, m) for m in range(config['n_members'])]  # plain GPTs: the fastest single path
    times = median_seconds(dict(
        together=lambda: model.generate(prompt, config['new_tokens'], temperature=0),
        apart=lambda: [member.generate(prompt, config['new_tokens'], temperature=0) for member in members]), config)
    return times['together'], times['apart']


def cache_seconds(config, model):
    """Seconds to decode cache_new_tokens greedily after a cache_prompt_len prompt: {(mixture, use_cache): s}."""
    prompt = torch.randint(config['vocab_size'], (1, config['cache_prompt_len']))
    runs = {(mixture, use_cache): (lambda mixture=mixture, use_cache=use_cache: model.generate(
                prompt, config['cache_new_tokens'], temperature=0, mixture=mixture, use_cache=use_cache))
            for mixture in ('sequence', None) for use_cache in (True, False)}
    return median_seconds(runs, config | dict(n_timed=max(1, config['n_timed'] // 4)))


def trunk_seconds(config, idx, labels):
    """Adapters on the top half: (step with the trunk shared, step without, forward of the frozen half for M members)."""
    n_layer, n_members = config['n_layer'], config['n_members']
    model = ensemble(config, n_members, layers=range(n_layer // 2, n_layer))
    step = training_step(lambda: loss_of(model(idx), labels), [p for p in model.parameters() if p.requires_grad])

    def step_sharing(share_trunk):
        model.share_trunk = share_trunk
        step()

    with torch.no_grad():
        embedded = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1]))  # (B, T, C)
        embedded = embedded.expand(n_members, *embedded.shape)                                     # (M, B, T, C)

    @torch.no_grad()
    def frozen_half():
        x = embedded
        for block in model.transformer.h[:n_layer // 2]:
            x = block(x)
    times = median_seconds(dict(shared=lambda: step_sharing(True), unshared=lambda: step_sharing(False),
                                frozen=frozen_half), config)
    return times['shared'], times['unshared'], times['frozen']


def print_profile(step, n_rows=12):
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=n_rows))


def peak_mb():
    """The most memory this process has held resident so far, in MB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    """One configuration of the memory table, in this fresh process: {ms per step, MB resident once the models
    are built, peak MB over the timed steps, MB saved for backward, adapter parameters per member}."""
    kind, n_members = config['memory_run'].split(':')
    n_members = int(n_members)
    idx = torch.randint(config['vocab_size'], (config['batch_size'], config['seq_len']))                  # (B, T)
    labels = idx.masked_fill(torch.arange(config['seq_len']) < config['prompt_len'], -100)               # (B, T)
    models = [ensemble(config, n_members)] if kind == 'ensemble' else [ensemble(config, 1) for _ in range(n_members)]
    params = [[p for p in model.parameters() if p.requires_grad] for model in models]
    steps = [training_step(lambda model=model: loss_of(model(idx), labels), model_params)
             for model, model_params in zip(models, params)]
    built = peak_mb()
    seconds = timings(dict(step=lambda: [step() for step in steps]), config['n_warmup'], config['n_timed'])['step']
    peak = peak_mb()
    saved = sum(saved_for_backward_mb(lambda model=model: loss_of(model(idx), labels)) for model in models)
    return dict(ms=statistics.median(seconds) * 1e3, built_mb=built, peak_mb=peak, saved_mb=saved,
                adapter_params=sum(p.numel() for model_params in params for p in model_params) // n_members)


def memory_table(config):
    """Step time and peak memory of M members on one base against M separate copies, each in a fresh process."""
    args = [f"--{key}={value}" for key, value in config.items() if key not in ('preset', 'memory_run')]
    runs = {}
    for n_members in [int(m) for m in config['memory_members'].split(',')]:
        for kind in ('ensemble', 'copies'):
            result = subprocess.run([sys.executable, '-m', 'experiments.throughput', *args,  # from the repository root
                                     f"--memory_run={kind}:{n_members}"], capture_output=True, text=True, check=True,
                                    cwd=ROOT)
            runs[kind, n_members] = json.loads(result.stdout.splitlines()[-1])
    members = sorted({m for _, m in runs})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model: {config['n_layer']} layers, n_embd "
          f"{config['n_embd']}, vocab {config['vocab_size']}, random weights; adapters of rank {config['lora_rank']} on "
          f"every block; per member a batch of B={config['batch_size']} x T={config['seq_len']} tokens; "
          f"median of {config['n_timed']} steps after {config['n_warmup']}")
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


def main(argv):
    preset = parse_args(defaults, argv)['preset']
    if preset not in ('', *PRESETS):
        raise UserError(f"--preset={preset}: expected '' or one of {', '.join(PRESETS)}")
    config = parse_args(defaults | PRESETS.get(preset, {}), argv)
    if config['n_threads']:
        torch.set_num_threads(config['n_threads'])
    torch.manual_seed(config['seed'])
    if config['memory_run']:
        print(json.dumps(memory_run(config)))
        return
    if config['memory']:
        memory_table(config)
        return
    load_before = os.getloadavg()
    n_members, batch_size, seq_len = config['n_members'], config['batch_size'], config['seq_len']
    idx = torch.randint(config['vocab_size'], (batch_size, seq_len))                   # (B, T)
    labels = idx.masked_fill(torch.arange(seq_len) < config['prompt_len'], -100)       # (B, T), prompt unlabelled
    ms = lambda seconds: f"{seconds * 1e3:9.1f}"

    peak = matmul_peak(config)
    batched, steps = step_variants(config, idx, labels)
    try:
        steps['d']()
    except Exception as error:  # torch.func may not cover every op
        print(f"(d) does not run: {type(error).__name__}: {error}")
        del steps['d']
    times = median_seconds(steps, config)
    flops = step_flops(batched, idx, labels)
    together, apart = decode_seconds(config, batched)
    cached = cache_seconds(config, batched)
    shared, unshared, frozen = trunk_seconds(config, idx, labels)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"model: {config['n_layer']} layers, n_embd {config['n_embd']}, vocab {config['vocab_size']}; "
          f"M={n_members} adapters of rank {config['lora_rank']}; batch B={batch_size} x T={seq_len} tokens")
    print(f"matmul peak (fp32, 1024^3, best of {config['n_timed']}): {peak / 1e9:.1f} GFLOP/s\n")
    print(f"{'training step (fwd + bwd + AdamW)':<46}{'ms':>9}  ratio")
    labels_of = dict(a=f"(a) ensemble, M={n_members} on B",
                     b=f"(b) one adapter on {n_members}*B",
                     c=f"(c) loop over {n_members} adapters, B each",
                     d="(d) torch.func stack_module_state + vmap")
    for name, seconds in times.items():
        ratio = '' if name == 'a' else f"(a)/({name}) = {times['a'] / seconds:.2f}"
        print(f"{labels_of[name]:<46}{ms(seconds)}  {ratio}")
    print(f"{'MFU of (a)':<46}{'':>9}  {flops / times['a'] / 1e9:.1f} GFLOP/s = {flops / times['a'] / peak:.0%} "
          f"of peak ({flops / 1e9:.2f} GFLOP per step)")
    new = n_members * config['new_tokens']
    print(f"\n{'decoding ' + str(config['new_tokens']) + ' tokens from one prompt':<46}{'ms':>9}  tokens/s")
    print(f"{f'{n_members} members together':<46}{ms(together)}  {new / together:.0f}")
    print(f"{f'{n_members} members one after another':<46}{ms(apart)}  {new / apart:.0f}"
          f"   together/apart speed-up {apart / together:.2f}")
    print(f"\n{'decoding ' + str(config['cache_new_tokens']) + ' tokens after ' + str(config['cache_prompt_len']):<46}"
          f"{'ms':>9}  tokens/s")
    for mixture in ('sequence', None):
        n_new = config['cache_new_tokens'] * (1 if mixture else n_members)
        for use_cache in (True, False):
            name = f"mixture={mixture}, {'KV cache' if use_cache else 'no cache'}"
            print(f"{name:<46}{ms(cached[mixture, use_cache])}  {n_new / cached[mixture, use_cache]:.0f}"
                  + (f"   cache speed-up {cached[mixture, False] / cached[mixture, True]:.2f}" if use_cache else ''))
    saved, ideal = unshared - shared, frozen * (n_members - 1) / n_members
    top_half = f"adapters on blocks {config['n_layer'] // 2}..{config['n_layer'] - 1} (step)"
    print(f"\n{top_half:<46}{'ms':>9}")
    print(f"{'trunk shared':<46}{ms(shared)}")
    print(f"{'trunk not shared':<46}{ms(unshared)}  saved {saved * 1e3:.1f} ms")
    print(f"{f'frozen half, forward for {n_members} members':<46}{ms(frozen)}  "
          f"ideal saving (M-1)/M of it = {ideal * 1e3:.1f} ms; saved/ideal = {saved / ideal:.2f}")
    mfu = flops / times['a'] / peak
    print(f"\ntargets: (a)/(b) = {times['a'] / times['b']:.2f} <= 1.15 {times['a'] <= 1.15 * times['b']}; "
          f"(c)/(a) = {times['c'] / times['a']:.2f} > 1 {times['c'] > times['a']}; "
          f"trunk saved/ideal = {saved / ideal:.2f} >= 1 {saved >= ideal}; MFU {mfu:.0%} >= 40% {mfu >= 0.4}; "
          f"cache speed-up (sequence mixture) {cached['sequence', False] / cached['sequence', True]:.2f} >= 3 "
          f"{cached['sequence', False] >= 3 * cached['sequence', True]}")
    if config['profile']:
        print("\nprofile of (a), 3 steps:")
        print_profile(steps['a'])


if __name__ == '__main__':
    run_script(main)
