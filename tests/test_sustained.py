"""The GEMM rate a training step sustains (HardwareProfile.sustained) against hand
computations, and its fit from published rows against a known answer."""
from dataclasses import replace

import pytest

from meshplan.core.errors import ProfileError
from meshplan.hw_profiles import gemm_model
from meshplan.hw_profiles.profile import HardwareProfile, Sustained, load_profile
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.plan import Cluster
from meshplan.planner.explain import explain
from meshplan.planner.search import search
from meshplan.validation.published import PublishedRun, fit_sustained_loss, predict

H100 = load_profile("h100-80gb")
FITTED = replace(H100, sustained=Sustained())


def test_a_compute_bound_gemm_slows_by_the_lost_rate_and_a_memory_bound_one_not():
    lossy = replace(H100, sustained=Sustained(0.2, "test"))
    fit = H100.gemm["bf16"]
    big = (8192, 8192, 8192)
    compute_s = 2.0 * 8192 ** 3 / (H100.peak_flops["bf16"] * gemm_model.gemm_efficiency(fit, *big))
    assert FITTED.gemm_time_s(*big, "bf16") == pytest.approx(fit.latency_s + compute_s, rel=1e-12)
    assert lossy.gemm_time_s(*big, "bf16") == pytest.approx(fit.latency_s + compute_s / 0.8, rel=1e-12)
    # one token through a 8192 x 8192 weight reads 128 MiB: the memory term, untouched
    assert lossy.gemm_time_s(1, 8192, 8192, "bf16") == FITTED.gemm_time_s(1, 8192, 8192, "bf16")


def test_profile_json_round_trips_the_loss_and_refuses_bad_ones():
    assert HardwareProfile.from_dict(H100.to_dict()).sustained == H100.sustained
    assert 0 < H100.sustained.gemm_loss < 0.2 and load_profile("a100-80gb").sustained.gemm_loss == 0.0
    assert HardwareProfile.from_dict({**H100.to_dict(), "sustained": {}}).sustained == Sustained()
    for bad, field in (({"gemm_loss": 1.0}, "sustained.gemm_loss"), ({"gemm_loss": -0.1}, "sustained.gemm_loss"),
                       ({"gemm_loss": 0.1, "clock": 1}, "sustained.clock")):
        with pytest.raises(ProfileError) as err:
            HardwareProfile.from_dict({**H100.to_dict(), "sustained": bad})
        assert err.value.field == field


def _run(run_id: str, hardware: str, gpus: int, measured_s: float) -> PublishedRun:
    fixed = {"global_batch": 4 * gpus, "seq_len": 4096, "dp": gpus, "tp": 1, "pp": 1, "cp": 1, "zero": 1,
             "micro_batch": 2, "recompute": "none", "dtype": "bf16"}
    return PublishedRun(run_id, "synthetic", ZOO["llama-2-7b"], hardware, Cluster(gpus, 8), fixed, measured_s,
                        None, "")


def test_the_fit_recovers_a_known_loss_from_its_profiles_fit_half_rows_only():
    """Dense H100 runs measured as meshplan predicts them at a 12% loss: the fit finds 12%
    from the fit-half rows (ids hashed there), and ignores a held-out row and a row on
    another profile that say otherwise."""
    truth = replace(H100, sustained=Sustained(0.12))
    runs = [_run(run_id, "h100-80gb", gpus, predict(_run(run_id, "h100-80gb", gpus, 1.0), truth).step_time_s)
            for run_id, gpus in (("synthetic-dense-1", 8), ("synthetic-dense-2", 16), ("synthetic-dense-3", 64))]
    held_out, elsewhere = _run("synthetic-dense-0", "h100-80gb", 8, 100.0), _run("synthetic-dense-4", "a100-80gb", 8, 1.0)
    assert all(run.fit_half for run in runs) and not held_out.fit_half and elsewhere.fit_half
    loss, terms = fit_sustained_loss(runs + [held_out, elsewhere], "h100-80gb")
    assert [t[0] for t in terms] == [run.id for run in runs] and all(0.3 < g < 1 for *_, g in terms)
    assert loss == pytest.approx(0.12, abs=0.005)


def test_the_explanation_states_the_sustained_rate_it_assumed():
    model, cluster, fixed = ZOO["llama-3-8b"], Cluster(8, 8), {"global_batch": 16, "seq_len": 4096}
    found = search(model, cluster, H100, fixed)
    text = "\n".join(explain(model, cluster, H100, found.ranked, fixed).lines())
    assert f"GEMMs at {1 - H100.sustained.gemm_loss:.1%} of the fitted rate" in text
    assert "--fit-sustained" in text
    a100 = load_profile("a100-80gb")
    found = search(model, cluster, a100, fixed)
    assert "of the fitted rate" not in "\n".join(explain(model, cluster, a100, found.ranked, fixed).lines())
