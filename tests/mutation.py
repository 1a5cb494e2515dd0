"""Mutation check: apply single-line bugs, one at a time, to a copy of numlm in a temporary folder and
run the test files each one names; print a markdown table of the first test that fails (if any).

    python tests/mutation.py                     # every mutation, Numba and NumPy paths
    python tests/mutation.py --only 1,2 --paths numpy
    python tests/mutation.py --tests-from REV    # the test suite as it was at git revision REV

Not collected by pytest (not named test_*): it runs pytest itself, several minutes in all."""
import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (module, bug, file, line as it is, line mutated, test files: the fast, targeted one first)
MUTATIONS = [
    ("finetune", "token classification labels every word piece, not only a word's first",
     "numlm/finetune.py", "labels.append(IGNORE if w is None or w == prev else e[\"labels\"][w])",
     "labels.append(IGNORE if w is None else e[\"labels\"][w])",
     ["test_finetune_labels.py", "test_finetune.py"]),
    ("finetune", "a QA answer's start shifted by one token",
     "numlm/finetune.py", "\"start_positions\": start if inside else 0", "\"start_positions\": start + 1 if inside else 0",
     ["test_finetune_labels.py", "test_finetune.py"]),
    ("finetune", "multiple choice drops the delimiter between context and choice",
     "numlm/finetune.py", "seqs.append(ctx[-room:] + [sep] + ans + [sep])", "seqs.append(ctx[-room:] + ans + [sep])",
     ["test_finetune_labels.py", "test_finetune.py"]),
    ("finetune", "prompt tuning does not move answer spans past the virtual tokens",
     "numlm/finetune.py", "shift = a.num_virtual_tokens if a.method == \"prompt\" and a.task in (\"tokcls\", \"qa\") else 0",
     "shift = 0", ["test_finetune_labels.py", "test_finetune.py"]),
    ("models", "float64 weights rounded through float32 on load",
     "numlm/models/pretrained.py", "model._load_checkpoint(load_safetensors(path), path)",
     "model._load_checkpoint({k: v.astype(np.float32) for k, v in load_safetensors(path).items()}, path)",
     ["test_float64.py", "test_bert.py", "test_gpt.py"]),
    ("peft", "a prefix gradient rounded through float32 in a float64 model",
     "numlm/peft/ops.py", "return d.sum(axis=1).transpose(2, 0, 1, 3).reshape(n, 2 * L * H * D)  # (n, L*2*C)",
     "return d.sum(axis=1).transpose(2, 0, 1, 3).reshape(n, 2 * L * H * D).astype(np.float32).astype(d.dtype)",
     ["test_peft_ops.py", "test_peft.py"]),
    ("data", "NSP draws the random second sentence 45% of the time instead of 50%",
     "numlm/data/pretrain.py", "if len(chunk) == 1 or rng.random() < 0.5:", "if len(chunk) == 1 or rng.random() < 0.45:",
     ["test_data.py"]),
    ("train", "the Trainer reads the learning-rate schedule one step ahead",
     "numlm/train.py", "lr = cfg.lr * self.schedule(self.step)", "lr = cfg.lr * self.schedule(self.step + 1)",
     ["test_train_lr.py", "test_train.py"]),
    ("ops", "a linear layer's weight gradient rounded through float32",
     "numlm/ops/linear.py", "dw = mm(x.reshape(-1, x.shape[-1]).T, dy2) if need_dw else None",
     "dw = mm(x.reshape(-1, x.shape[-1]).T, dy2).astype('float32').astype(dy2.dtype) if need_dw else None",
     ["test_ops.py"]),
    ("ops", "LayerNorm's bias gradient halved (NumPy path)",
     "numlm/ops/layernorm.py", "dbeta = dy2.sum(axis=0)", "dbeta = dy2.sum(axis=0) * 0.5", ["test_ops.py"]),
    ("kernels", "the LayerNorm backward kernel drops mean(dxhat)",
     "numlm/kernels/layernorm.py", "dx[n, c] = r * (dy[n, c] * gamma[c] - a - xhat[n, c] * b)",
     "dx[n, c] = r * (dy[n, c] * gamma[c] - xhat[n, c] * b)", ["test_kernels.py", "test_ops.py"]),
    ("kernels", "the Adam kernel forgets the second-moment bias correction",
     "numlm/kernels/adam.py", "denom = np.sqrt(vi) / bc2_sqrt + eps", "denom = np.sqrt(vi) + eps",
     ["test_optim.py", "test_kernels.py"]),
    ("nn", "gradients overwrite instead of accumulating",
     "numlm/nn/layers.py", "self.grads[name] += g", "self.grads[name][...] = g", ["test_nn.py", "test_gpt.py"]),
    ("models", "GPT's positions shifted by one",
     "numlm/models/gpt.py", "h = h + self.wpe(x.pos)",
     "h = h + self.wpe(np.minimum(x.pos + 1, self.wpe.params['weight'].shape[0] - 1))",
     ["test_gpt.py"]),
    ("models", "the causal-LM loss predicts the current token, not the next",
     "numlm/models/gpt.py", "targets[..., :-1] = labels[..., 1:]", "targets[..., :-1] = labels[..., :-1]",
     ["test_gpt.py"]),
    ("peft", "LoRA's scaling alpha instead of alpha / r",
     "numlm/peft/layers.py", "self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r",
     "self.scaling = alpha / math.sqrt(r) if use_rslora else alpha", ["test_peft.py"]),
    ("optim", "weight decay applied to biases and LayerNorm weights",
     "numlm/optim.py", "return name.endswith(\"bias\") or _LN.search(name) is not None", "return False",
     ["test_optim.py"]),
    ("optim", "Adam's first-moment bias correction dropped",
     "numlm/optim.py", "return lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5, 1 - beta1",
     "return lr, (1 - beta2 ** step) ** 0.5, 1 - beta1", ["test_optim.py"]),
    ("train", "gradient accumulation sums instead of averaging",
     "numlm/train.py", "g *= g.dtype.type(1.0 / cfg.grad_accum)", "g *= g.dtype.type(1.0)", ["test_train.py"]),
    ("data", "BERT masking: [MASK] 75% of the chosen tokens, not 80%",
     "numlm/data/pretrain.py", "replaced = (rng.random(ids.shape) < 0.8) & chosen",
     "replaced = (rng.random(ids.shape) < 0.75) & chosen", ["test_data.py"]),
    ("data", "multiple choice: the head reads the token before the extract token",
     "numlm/data/tasks.py", "mc_token_ids[b, n] = len(s) - 1", "mc_token_ids[b, n] = len(s) - 2",
     ["test_data_tasks.py", "test_finetune_labels.py"]),
    ("decoding", "positions from a padded prompt start at 1",
     "numlm/decoding.py", "pos = np.cumsum(mask, axis=1) - 1", "pos = np.cumsum(mask, axis=1)", ["test_generate.py"]),
    ("io", "a sharded checkpoint keeps only its last shard",
     "numlm/io/checkpoint.py", "state.update(_load_file(d / shard))", "state = _load_file(d / shard)",
     ["test_gpt.py", "test_bert.py"]),
    ("inference", "mean pooling counts padding",
     "numlm/inference.py", "e = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)",
     "e = hidden.mean(axis=1)", ["test_inference.py"]),
    ("recipes", "pre-training ignores --dtype float64",
     "numlm/recipes.py", "        model.astype(dtype)\n", "        model.astype('float32')\n",
     ["test_recipes.py", "test_cli.py"]),
    ("gradchecking", "central differences divided by eps, not 2 eps",
     "numlm/gradchecking.py", "numeric[n] = (fp - fm) / (2 * eps)", "numeric[n] = (fp - fm) / eps",
     ["test_gradcheck.py"]),
]


def copy_tree(dest, tests_from=None):
    """numlm, tests (fixtures linked, not copied), pyproject.toml and README.md under dest."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "fixtures")
    shutil.copytree(ROOT / "numlm", dest / "numlm", ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, dest / f)
    if tests_from is None:
        shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    else:  # the suite as it was at a revision, to compare
        (dest / "tests").mkdir()
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", tests_from, "tests"], check=True,
                             capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest), "--exclude=tests/fixtures"], input=tar, check=True)
    (dest / "tests" / "fixtures").symlink_to(ROOT / "tests" / "fixtures")


def pytest(dest, targets, numba):
    env = dict(os.environ, PYTHONPATH=str(dest), NUMLM_NUMBA="1" if numba else "0")
    cmd = [sys.executable, "-m", "pytest", *targets, "-x", "-q", "-p", "no:cacheprovider"]
    return subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=1800)


def run_tests(dest, files, numba, mutated):
    """The first failing test's id (checked to pass without the bug), 'survived', or what else
    stopped pytest."""
    files = [f"tests/{f}" for f in files if (dest / "tests" / f).is_file()]
    if not files:
        return "no test file"
    p = pytest(dest, files, numba)
    if p.returncode == 0:
        return "**survived**"
    m = re.search(r"^(?:FAILED|ERROR) (\S+?)(?: - .*)?$", p.stdout, re.M)
    if p.returncode != 1 or not m:
        return f"pytest exit {p.returncode}: " + (p.stdout + p.stderr).strip().splitlines()[-1][:80]
    with mutated.undone():
        if pytest(dest, [m.group(1)], numba).returncode != 0:
            return f"`{m.group(1)}` fails without the bug too"
    return "`" + m.group(1).split("tests/", 1)[-1] + "`"


class Mutated:
    """One file with one line replaced; undone() restores it for a while."""

    def __init__(self, path, old, new):
        self.path, self.original = path, path.read_text()
        n = self.original.count(old)
        self.problem = None if n == 1 else f"stale: the line occurs {n} times"
        self.mutated = self.original.replace(old, new)

    def __enter__(self):
        if not self.problem:
            self.path.write_text(self.mutated)
        return self

    def __exit__(self, *exc):
        self.path.write_text(self.original)

    @contextlib.contextmanager
    def undone(self):
        self.path.write_text(self.original)
        try:
            yield
        finally:
            self.path.write_text(self.mutated)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated mutation numbers (1-based)")
    ap.add_argument("--paths", default="numba,numpy", help="kernel paths: numba, numpy or both")
    ap.add_argument("--tests-from", help="git revision whose tests/ to run instead of the working tree's")
    a = ap.parse_args(argv)
    chosen = [int(i) for i in a.only.split(",")] if a.only else range(1, len(MUTATIONS) + 1)
    paths = [p.strip() for p in a.paths.split(",")]
    print("| # | module | deliberate bug | " + " | ".join(f"caught by ({p})" for p in paths) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in paths) + " |")
    survived = 0
    with tempfile.TemporaryDirectory(prefix="numlm-mutation-") as tmp:
        dest = Path(tmp)
        copy_tree(dest, a.tests_from)
        for i in chosen:
            module, bug, file, old, new, files = MUTATIONS[i - 1]
            with Mutated(dest / file, old, new) as m:
                cells = [m.problem or run_tests(dest, files, p == "numba", m) for p in paths]
            survived += not all(c.startswith("`") and c.endswith("`") for c in cells)
            print(f"| {i} | {module} | {bug} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{len(chosen) - survived} of {len(chosen)} caught on every path")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
