"""Triton kernels and their launchers, installed as ``contrastgen.kernels``.

Import the submodules only where triton is installed; nothing here is imported by
``import contrastgen`` unless a Triton backend is used."""
