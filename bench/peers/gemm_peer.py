"""GFLOP/s of OpenBLAS (numpy) and MKL (torch) on the native training step's products, beside
`cargo run --release --locked -p ranker-service --example gemm_probe -- 2` in the same run.

    OPENBLAS_NUM_THREADS=2 target/peer-venv/bin/python bench/peers/gemm_peer.py
"""
import time

import numpy as np
import torch

torch.set_num_threads(2)
# (rows = prompt tokens, k, n): qkv/o, gate_up and down forward, their transposes backward.
SHAPES = [(623, 576, 1536), (623, 1536, 576), (623, 576, 576), (623, 576, 192), (623, 192, 576)]


def gflops(f, m, k, n, seconds=1.0):
    f()
    t, it = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        f()
        it += 1
    return 2 * m * k * n / ((time.perf_counter() - t) / it) / 1e9


for m, k, n in SHAPES:
    a = np.random.rand(m, k).astype(np.float32)
    b = np.random.rand(k, n).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    tbt = torch.from_numpy(np.ascontiguousarray(b.T))
    print((m, k, n),
          f"numpy-openblas {gflops(lambda: a @ b, m, k, n):.0f}",
          f"torch-mkl {gflops(lambda: ta @ tb, m, k, n):.0f}",
          f"torch-mkl-transposed {gflops(lambda: ta @ tbt.T, m, k, n):.0f}")
