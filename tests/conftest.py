"""Fixtures shared by the test modules: one thread per test process and one tiny pretrained base."""
import pytest
import torch

import benchmark
import pretrain

# The tiny base of the end-to-end tests: 2 layers of width 32, 200 steps. That is enough for
# 20 adapter steps to fine-tune it visibly (17.4 -> 7.9 nats per example); on a 30-step base
# they barely move the loss.
TINY_BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, max_iters=200, warmup_iters=5, learning_rate=1e-2,
                 min_lr=1e-3, batch_size=8, eval_iters=2, log_interval=1000, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small train fastest on one thread, and far slower on two when the CPU is shared."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The path of a tiny pretrained base checkpoint, made once for the whole test session."""
    root = tmp_path_factory.mktemp("base")
    text_path = root / "text.txt"
    text_path.write_text(pretrain.pretrain_text(seed=0, n_documents=300), encoding="utf-8")
    pretrain.pretrain(pretrain.defaults | TINY_BASE | dict(data=str(text_path), out_path=str(root / "base.pt")))
    return str(root / "base.pt")


@pytest.fixture(scope="session")
def bench():
    """The benchmark's splits at seed 0, made once for the whole test session (read-only in every test)."""
    return benchmark.make_benchmark(seed=0)
