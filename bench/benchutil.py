"""Shared benchmark helpers."""
import torch

# Triton is timed on a GPU only: under the CPU interpreter its times mean nothing.
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")


def sync():
    if GPU:
        torch.cuda.synchronize()
