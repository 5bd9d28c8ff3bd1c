"""Stock profiles derived from a measured one by datasheet ratios: a device whose compute
is its base's and whose memory, bandwidth, clock or links differ (profile.load_profile
builds each from its base with HardwareProfile.scaled, named and sourced as a variant)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    base: str            # the measured stock profile it derives from
    device_name: str
    factors: dict        # HardwareProfile.scaled's resource factors
    source: str          # the datasheet or report the factors come from


VARIANTS = {
    # NVIDIA A100 datasheet (2021), 40GB SXM column: 40 GB HBM2 at 1,555 GB/s (80GB: 2,039)
    "a100-40gb": Variant("a100-80gb", "NVIDIA A100-SXM4-40GB", {"memory": 0.5, "hbm_bw": 1555 / 2039},
                         "A100 40GB datasheet: 40 GB HBM2 at 1,555 GB/s, compute as the 80GB part"),
    # NVIDIA H200 datasheet (2024): 141 GB HBM3e at 4.8 TB/s, compute as H100 SXM
    "h200-141gb": Variant("h100-80gb", "NVIDIA H200 SXM 141GB", {"memory": 141 / 80, "hbm_bw": 4.8 / 3.35},
                          "H200 datasheet: 141 GB HBM3e at 4.8 TB/s, compute as H100 SXM"),
    # H800 SXM: the H100 SXM with NVLink cut to 400 GB/s (from 900), DeepSeek-V3 report sec 3.1
    "h800-80gb": Variant("h100-80gb", "NVIDIA H800 SXM", {"intra_node_bw": 400 / 900},
                         "H800: NVLink 400 GB/s of the H100's 900 (DeepSeek-V3 report sec 3.1)"),
    # Jean Zay's A100 80GB nodes (BLOOM's training): 4 Omni-Path links of 100 Gb/s per node
    # (bigscience train/tr11-176B-ml/README.md, Hardware), a quarter of DGX A100's 8 x 200 Gb/s
    "a100-80gb-opa4": Variant("a100-80gb", "NVIDIA A100-SXM4-80GB, 4 x 100 Gb/s Omni-Path a node",
                              {"inter_node_bw": 4 * 100 / (8 * 200)},
                              "Jean Zay A100 80GB: 4 Omni-Path 100 Gb/s links per node (BLOOM tr11 README)"),
    # torchtitan's Grand Teton H100: 96 GB HBM2e at 500 W (its benchmark page). HBM2e H100:
    # 2.41 TB/s (arXiv 2604.11391 sec 3); at 500 of 700 W the clock, and so the compute rate,
    # falls as power^(1/3) (dynamic power ~ C V^2 f with V ~ f): (500/700)^(1/3) = 0.894
    "h100-96gb-500w": Variant("h100-80gb", "NVIDIA H100 SXM 96GB HBM2e at 500 W",
                              {"memory": 96 / 80, "hbm_bw": 2.41 / 3.35, "flops": (500 / 700) ** (1 / 3)},
                              "H100 96GB HBM2e at 500 W (torchtitan benchmark page)"),
}


def base_of(name: str) -> str:
    """The measured stock profile `name` is, or derives from."""
    return VARIANTS[name].base if name in VARIANTS else name
