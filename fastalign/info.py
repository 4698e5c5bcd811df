"""``python -m fastalign.info``: which kernels this install runs, per device.

Prints the versions, whether the compiled core holds the CUDA C++ kernels, and for CUDA
tensors which path each op family takes (Triton, CUDA C++, or plain torch on the device).
"""
from __future__ import annotations

import importlib


def info() -> dict:
    import torch

    from fastalign import _backend

    def version(mod):
        try:
            return getattr(importlib.import_module(mod), "__version__", "installed")
        except Exception:
            return None

    cuda_cpp = _backend.cuda_kernels_available()
    return {
        "torch": torch.__version__,
        "triton": version("triton"),
        "cuda device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "CUDA C++ kernels compiled": cuda_cpp,
        "on CUDA tensors": {
            "token_logprobs / linear_logprobs / policy_loss": "Triton (backend='cuda': CUDA C++ token kernels)"
            if cuda_cpp else "Triton",
            "group advantages": "CUDA C++" if cuda_cpp else "plain torch on the device",
            "returns / GAE scans": "CUDA C++" if cuda_cpp else "Triton",
            "Clip-Cov / KL-Cov selection": "CUDA C++" if cuda_cpp else "plain torch on the device",
        },
        "on CPU tensors": "C++ (OpenMP); Triton under TRITON_INTERPRET=1 with backend='triton'",
    }


def main() -> None:
    for key, value in info().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
