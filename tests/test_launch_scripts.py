"""Launch scripts: the Slurm and torchrun forms parsed line by line, and a real `meshplan run`
of 2 CPU ranks on 2 "nodes" started by the Slurm script through a stand-in srun."""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshplan.planner.launch_scripts import Launch, slurm_script, torchrun_script
from tests.cli import meshplan

ROOT = Path(__file__).resolve().parents[1]
FAKE_SLURM = ROOT / "tests/data/fake_slurm"
TINY = ROOT / "examples/tiny-llama/config.json"

JOB = Launch(name="job", header="a job", nnodes=4, gpus_per_node=8, rendezvous="torchrun",
             program=("-m", "torchtitan.train"),
             args=("--module", "llama3", "--parallelism.module-fqns-per-model-part", "a,b", "c,d",
                   "--hf-assets-path", "${HF_ASSETS_PATH}", "--training.disable-cuda-graphs",
                   "activation-checkpoint:full"),
             env=(("CUDA_DEVICE_MAX_CONNECTIONS", "1"),), files=(("job.toml", "[a]\nb = 1\n"),),
             user_paths=(("HF_ASSETS_PATH", "the tokenizer folder"),))


def sbatch_options(script: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, re.MULTILINE))


def args_array(script: str) -> list[str]:
    """The words of the ARGS=( ... ) array, as bash would split them (variables kept)."""
    body = script.split("ARGS=(\n", 1)[1].split("\n)\n", 1)[0]
    return shlex.split(body)


def test_slurm_script_takes_nodes_and_rendezvous_from_slurm():
    script = slurm_script(JOB)
    assert sbatch_options(script) == {"job-name": "job", "nodes": "4", "ntasks-per-node": "1",
                                      "gpus-per-node": "8", "exclusive": ""}
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    assert 'export NNODES="$SLURM_NNODES" RDZV_ID="$SLURM_JOB_ID"' in script
    srun = script.strip().splitlines()[-1]
    words = shlex.split(srun)
    assert words[:4] == ["srun", '--nodes=$NNODES', "--ntasks-per-node=1", "bash"]
    task = shlex.split(words[5])
    assert task[:4] == ["NODE_RANK=$SLURM_NODEID;", "exec", "torchrun", "--nnodes"]
    assert task[task.index("--nproc-per-node") + 1] == "8"
    assert task[task.index("--rdzv-endpoint") + 1] == "$MASTER_ADDR:$MASTER_PORT"
    assert task[-3:] == ["-m", "torchtitan.train", "$@"]
    assert args_array(script) == list(JOB.args)
    assert ': "${HF_ASSETS_PATH:?set HF_ASSETS_PATH to the tokenizer folder}"' in script
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script
    assert "cat > job.toml <<'MESHPLAN_EOF'\n[a]\nb = 1\nMESHPLAN_EOF" in script


def test_torchrun_script_defaults_to_one_node_and_runs_bash(tmp_path):
    script = torchrun_script(JOB)
    assert 'NNODES="${NNODES:-4}"' in script and 'NODE_RANK="${NODE_RANK:-0}"' in script
    assert script.strip().splitlines()[-1].startswith('exec torchrun --nnodes "$NNODES"')
    # bash accepts it, and it stops on an unset path, naming it, before writing anything
    path = tmp_path / "run.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    out = subprocess.run(["bash", str(path)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]})
    assert out.returncode != 0 and "set HF_ASSETS_PATH to the tokenizer folder" in out.stderr
    assert not (tmp_path / "job.toml").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_script_carries_the_checkpoints_restarts_and_rendezvous_wait(tmp_path):
    """Each node's `meshplan run` gets the run's checkpoint folder (one absolute path, as on a
    shared file system), how often to save, to resume, its restarts and how long to wait at
    the rendezvous: a script that dropped them would train a cluster job unprotected."""
    folder = tmp_path / "ck"
    out = meshplan("run", "--model", str(TINY), "--gpus", "2", "--gpus-per-node", "1", "--global-batch", "8",
                   "--seq-len", "64", "--steps", "6", "--checkpoint-dir", str(folder), "--checkpoint-every", "2",
                   "--resume", "--max-restarts", "2", "--rdzv-timeout-s", "900", "--launch-script", "torchrun",
                   "--no-probe")
    assert out.returncode == 0, out.stderr
    words = out.stdout.split("ARGS=(\n", 1)[1].split("\n)\n", 1)[0].split()
    pairs = dict(zip(words, words[1:]))
    assert pairs["--checkpoint-dir"] == str(folder.resolve()) and pairs["--checkpoint-every"] == "2"
    assert pairs["--max-restarts"] == "2" and pairs["--rdzv-timeout-s"] == "900.0" and "--resume" in words
    assert not folder.exists()  # nothing written before the job runs


@pytest.mark.slow
def test_slurm_script_runs_meshplan_run_through_srun(tmp_path):
    """sbatch's environment, srun and scontrol stand-ins: srun starts one `meshplan run` per
    "node" on this machine, and the two ranks meet at the rendezvous the script sets up."""
    out = meshplan("run", "--model", str(TINY), "--gpus", "2", "--gpus-per-node", "1",
                   "--global-batch", "8", "--micro-batch", "2", "--seq-len", "64", "--steps", "4",
                   "--warmup", "1", "--record", "record.json", "--launch-script", "slurm", "--no-probe")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    assert sbatch_options(script)["nodes"] == "2" and sbatch_options(script)["gpus-per-node"] == "1"
    assert json.loads(script.split("<<'MESHPLAN_EOF'\n", 1)[1].split("MESHPLAN_EOF")[0])["dp"] == 2
    (tmp_path / "job.sbatch").write_text(script)
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{FAKE_SLURM}:{venv_bin}:{os.environ['PATH']}",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]",
           "MASTER_PORT": str(free_port())}
    run = subprocess.run(["bash", "job.sbatch"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["world_size"] == 2 and len(record["measurement"]["losses"]) == 4
