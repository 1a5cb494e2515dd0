"""Configs are dataclasses read from and written to transformers' config.json."""
import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass
class Config:
    """Base: subclasses declare transformers' field names with their defaults. Fields numlm does not
    use are kept in `extra` and written back, so a saved config.json round-trips."""

    model_type = ""

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        if "num_labels" not in d and isinstance(d.get("id2label"), dict):
            d = {**d, "num_labels": len(d["id2label"])}  # transformers derives num_labels from id2label
        if d.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"config model_type {d.get('model_type')!r} does not match {cls.model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.extra = {k: v for k, v in d.items() if k not in names and k != "model_type"}
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self):
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        d["model_type"] = self.model_type
        n = d.get("num_labels")
        if n is not None and not (isinstance(d.get("id2label"), dict) and len(d["id2label"]) == n):
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}  # what transformers writes
            d["label2id"] = {f"LABEL_{i}": i for i in range(n)}
        return d

    def validate(self):
        """Refuse values numlm does not implement, with a clear error (subclasses extend)."""

    def _positive(self, *names):
        for n in names:
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config {n} must be a positive integer, got {v!r}")

    def _probability(self, *names):
        for n in names:
            v = getattr(self, n)
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"config {n} must lie in [0, 1), got {v!r}")
