"""Launch a script as real processes, forked from a warm interpreter (docs/design.md section 7: fast tests).

Each launch of a script costs ~3 CPU-seconds of imports (torch, transformers, datasets, accelerate;
DeepSpeed ~1.6 more) before it does any work, and `accelerate launch` adds ~1.6 for itself: most of
the suite's time. Here a multiprocessing forkserver imports them once per test worker, and every
launch forks fresh processes from it. Each process is still a new OS process running the script
as `__main__` with its own argv, environment, working directory and stdout/stderr, so the scripts
see what a command line gives them:
- one process, as `python script.py ...`;
- N processes, each given the environment `accelerate launch` prepares (accelerate's own
  `prepare_multi_gpu_env` / `prepare_deepspeed_cmd_env`, from the same launcher arguments and
  config file) plus the rank variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*).
What this does not exercise is the launcher binary itself (torchrun's elastic agent): the tests
that launch through the real `accelerate launch` command (run_accelerate / run_deepspeed with
real_launcher=True) cover that.
"""

import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

PRELOAD = [
    "torch",
    "transformers",
    "datasets",
    "accelerate",
    "tyro",
    "safetensors.torch",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.gpt_neox.modeling_gpt_neox",
    "transformers.models.gpt2.modeling_gpt2",
    "deepspeed",
    "warm_launch",
]
_context = None


def _forkserver():
    """The forkserver, started once with PRELOAD imported. It must stay single-threaded: a fork copies
    only the forking thread, so a lock another thread held (in malloc, say) stays locked in the child
    forever. pyarrow (imported by datasets) starts its jemalloc's background thread when it loads;
    JE_ARROW_MALLOC_CONF switches that thread off, in the server only (real launches keep it)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        with mock.patch.dict(os.environ, JE_ARROW_MALLOC_CONF="background_thread:false"):
            multiprocessing.forkserver.ensure_running()
    return _context


def forkserver_threads() -> list:
    """The names of the forkserver's threads (Linux); one when it is safe to fork from."""
    p = _forkserver().Process(target=os.getpid)  # served only once PRELOAD is imported
    p.start()
    p.join()
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    tasks = Path(f"/proc/{pid}/task")
    return [(tasks / t / "comm").read_text().strip() for t in sorted(os.listdir(tasks))]


def _child(script: str, argv: list, env: dict, cwd: str, out: str, err: str, shim: str | None):
    """In the forked process: become `python script argv...` and run it as __main__."""
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [script, *argv]
    sys.path[0:0] = [str(Path(script).parent)]
    if shim:  # what the launched interpreter's sitecustomize would do at start-up
        runpy.run_path(shim)
    runpy.run_path(script, run_name="__main__")


def start_one(script: str, argv: list, env: dict, cwd: str, out: str, err: str):
    """One process of `python script argv...`, forked as run() forks it and returned running, for a test
    that kills it (Process.kill is a real SIGKILL of that OS process)."""
    p = _forkserver().Process(target=_child, args=(script, argv, env, cwd, out, err, None))
    p.start()
    return p


def launch_env(launcher_args: list, script: str, base_env: dict) -> dict:
    """The environment `accelerate launch launcher_args script` gives its processes (before ranks)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(base_env)
    try:
        args = launch_command_parser().parse_args([*launcher_args, script])
        args, defaults, mixed_precision_from_config = _validate_launch_command(args)
        if args.use_deepspeed:  # as accelerate's launch_command does before deepspeed_launcher
            fields = list(defaults.deepspeed_config) if defaults else []
            fields += ["mixed_precision"] if mixed_precision_from_config else []
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
            env = prepare_deepspeed_cmd_env(args)[1]
        else:
            env = prepare_multi_gpu_env(args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return dict(env)


def run(
    script: str,
    argv: list,
    env: dict,
    cwd: str,
    num_processes: int = 1,
    port: int | None = None,
    timeout: float = 600,
    shim: str | None = None,
) -> subprocess.CompletedProcess:
    """Run `script argv` in num_processes forked processes; their outputs are joined in rank order.
    If one process fails, the others are stopped a few seconds later (as torchrun does)."""
    with tempfile.TemporaryDirectory() as tmp:
        procs, files = start(script, argv, env, cwd, tmp, num_processes, port, shim)
        deadline, failed_at = time.time() + timeout, None
        while any(p.is_alive() for p in procs):
            if time.time() > deadline:
                for p in procs:
                    p.kill()
                    p.join()
                raise subprocess.TimeoutExpired([script, *argv], timeout, *_outputs(files))
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = time.time()
            if failed_at is not None and time.time() > failed_at + 5:
                for p in procs:
                    p.kill()
            time.sleep(0.05)
        for p in procs:
            p.join()
        codes = [p.exitcode for p in procs]
        stdout, stderr = _outputs(files)
    code = next((c for c in codes if c != 0), 0)
    return subprocess.CompletedProcess([script, *argv], code, stdout, stderr)


def start(
    script: str,
    argv: list,
    env: dict,
    cwd: str,
    tmp: str,
    num_processes: int = 1,
    port: int | None = None,
    shim: str | None = None,
) -> tuple:
    """Fork the launch's processes and return at once: (processes, their (stdout, stderr) files in
    tmp). A test may signal a process (os.kill(p.pid, ...)) as a scheduler would, then join it."""
    ctx = _forkserver()
    procs, files = [], []
    for rank in range(num_processes):
        rank_env = dict(env)
        if port is not None:  # launched: the variables torchrun gives each process
            rank_env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                GROUP_RANK="0",
                ROLE_RANK=str(rank),
                WORLD_SIZE=str(num_processes),
                LOCAL_WORLD_SIZE=str(num_processes),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        out, err = f"{tmp}/out{rank}", f"{tmp}/err{rank}"
        p = ctx.Process(target=_child, args=(script, argv, rank_env, cwd, out, err, shim))
        p.start()
        procs.append(p)
        files.append((out, err))
    return procs, files


def _outputs(files: list) -> tuple:
    """(stdout, stderr) of the launch's processes, joined in rank order; a process that died before
    its first line has no file."""
    read = lambda path: Path(path).read_text(errors="replace") if Path(path).exists() else ""
    return "".join(read(out) for out, _ in files), "".join(read(err) for _, err in files)


def stop():
    """Stop the forkserver and wait for it, so the CPU time of every launch (its reaped children) is
    charged to this process, as subprocess.run's would be: `/usr/bin/time pytest` counts it all."""
    if _context is not None:
        multiprocessing.forkserver._forkserver._stop()
