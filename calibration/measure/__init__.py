"""Measure this machine with torch into hw_profiles.samples tables: compute (GEMMs and
memory-bound operators), collectives (torchrun + torch.distributed), the machine's description,
and run (all of it, saved as JSON)."""
