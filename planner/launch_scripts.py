"""Launch scripts: how a job's ranks start on a cluster, as a bash script.

- Slurm (`sbatch` script): one task per node (`srun`), each running the node's launcher with
  the rendezvous at the allocation's first node (scontrol show hostnames $SLURM_JOB_NODELIST),
  node count and GPUs per node from the plan.
- Plain torchrun: the same node command, run by hand on every node with NNODES, NODE_RANK,
  MASTER_ADDR and MASTER_PORT set (one node by default).

A job's node command is either torchrun around a training program (`rendezvous="torchrun"`),
or a program that starts its own ranks and takes the rendezvous as flags: `meshplan run`
(`"meshplan"`) or `vllm serve` (`"vllm"`). Paths the user supplies are "${NAME}" in the
arguments; the script stops with a message naming any that is unset.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

KINDS = ("slurm", "torchrun")
SUBCOMMAND = re.compile(r"[a-z][a-z-]*:[a-z-]+")  # e.g. torchtitan's activation-checkpoint:full
RENDEZVOUS_PORT = 29500
# Each node's rendezvous flags for launchers that take it themselves.
NODE_FLAGS = {
    "meshplan": '--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"',
    # vLLM multi-node (engine arguments --nnodes/--node-rank/--master-addr/--master-port): the
    # nodes after the first run headless workers
    "vllm": '--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" '
            '--master-port "$MASTER_PORT" $([ "$NODE_RANK" -gt 0 ] && echo --headless)',
}


@dataclass(frozen=True)
class Launch:
    """One job to launch: `program` (words) with `args` on `nnodes` nodes of `gpus_per_node`
    ranks; `env` exported first, `files` (name, text) written beside it, `user_paths`
    (NAME, what it is) required in the environment."""

    name: str
    header: str
    nnodes: int
    gpus_per_node: int
    rendezvous: str
    program: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    user_paths: tuple[tuple[str, str], ...] = ()


def _word(word: str) -> str:
    return f'"{word}"' if "${" in word else shlex.quote(word)


def _args_array(args: tuple[str, ...]) -> list[str]:
    """ARGS=( ... ) with each flag and its values on one line."""
    lines: list[list[str]] = []
    for word in args:
        positional = not lines or not lines[-1][0].startswith("-")
        if positional or word.startswith("-") or SUBCOMMAND.fullmatch(word):
            lines.append([])
        lines[-1].append(_word(word))
    return ["ARGS=("] + [f"  {' '.join(line)}" for line in lines] + [")"]


def _node_command(launch: Launch, args_ref: str) -> str:
    program = " ".join(shlex.quote(w) for w in launch.program)
    if launch.rendezvous == "torchrun":
        return (f'torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" '
                f'--nproc-per-node {launch.gpus_per_node} --rdzv-backend c10d '
                f'--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" {program} {args_ref}')
    flags = NODE_FLAGS[launch.rendezvous] if launch.nnodes > 1 else ""
    return f"{program} {args_ref} {flags}".rstrip()


def _body(launch: Launch) -> list[str]:
    """Required paths, environment, files and the ARGS array."""
    lines = [f': "${{{name}:?set {name} to {what}}}"' for name, what in launch.user_paths]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in launch.env]
    for name, text in launch.files:
        lines += [f"cat > {shlex.quote(name)} <<'MESHPLAN_EOF'", text.rstrip("\n"), "MESHPLAN_EOF"]
    return lines + _args_array(launch.args)


def torchrun_script(launch: Launch) -> str:
    """Run on each node, with NODE_RANK (0 .. NNODES-1) and the first node's MASTER_ADDR."""
    lines = ["#!/usr/bin/env bash", f"# {launch.header}",
             f"# Run this script on each of the {launch.nnodes} node(s) with NODE_RANK set "
             "(0 on the first) and MASTER_ADDR the first node's address.",
             "set -euo pipefail",
             f'NNODES="${{NNODES:-{launch.nnodes}}}"', 'NODE_RANK="${NODE_RANK:-0}"',
             'MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"', f'MASTER_PORT="${{MASTER_PORT:-{RENDEZVOUS_PORT}}}"',
             f'RDZV_ID="${{RDZV_ID:-{launch.name}}}"']
    lines += _body(launch)
    lines.append(f'exec {_node_command(launch, chr(34) + "${ARGS[@]}" + chr(34))}')
    return "\n".join(lines) + "\n"


def slurm_script(launch: Launch) -> str:
    """An sbatch script: srun starts one task per node, and each runs the node command with
    NODE_RANK = SLURM_NODEID."""
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={launch.name}",
             f"#SBATCH --nodes={launch.nnodes}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --gpus-per-node={launch.gpus_per_node}", "#SBATCH --exclusive",
             f"# {launch.header}", "set -euo pipefail",
             'export NNODES="$SLURM_NNODES" RDZV_ID="$SLURM_JOB_ID"',
             'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
             f'export MASTER_PORT="${{MASTER_PORT:-{RENDEZVOUS_PORT}}}"']
    lines += _body(launch)
    task = shlex.quote(f'NODE_RANK="$SLURM_NODEID"; exec {_node_command(launch, chr(34) + "$@" + chr(34))}')
    lines.append(f'srun --nodes="$NNODES" --ntasks-per-node=1 bash -c {task} bash "${{ARGS[@]}}"')
    return "\n".join(lines) + "\n"


def script(kind: str, launch: Launch) -> str:
    return {"slurm": slurm_script, "torchrun": torchrun_script}[kind](launch)
