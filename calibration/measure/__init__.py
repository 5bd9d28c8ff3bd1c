"""Measure this machine with torch into calibration.samples tables: compute (GEMMs and
memory-bound operators), collectives (torchrun + torch.distributed), the machine's description,
and run (all of it, saved as JSON)."""
