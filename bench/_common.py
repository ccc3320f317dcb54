"""What the benchmark scripts share: where the repository and the guest
assets are, and how much memory a process costs the host."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def asset_path(env, default):
    """The file $env names, else REPO/default; FileNotFoundError if missing."""
    path = os.environ.get(env) or os.path.join(REPO, default)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing (run scripts/setup.sh or set {env})")
    return path


def pss_kib(pid):
    """The process's proportional set size (KiB), from smaps_rollup."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")
