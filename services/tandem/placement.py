"""Where an edge agent runs each model's requests.

`edge` answers here, `cloud` sends the input up, `split:K` runs stages 1..K here and
sends the activation, `cascade:T[:CLOUD_MODEL]` answers here when the model's
confidence (largest softmax probability) is at least T and asks the cloud (with a
larger model, if named) otherwise. Until the placement controller decides, a flag
sets it; the controller will set the same object.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem import staged, tasks

MODES = ("edge", "cloud", "split", "cascade")


@dataclass(frozen=True)
class Placement:
    mode: str
    split: int = 0  # split: stages run at the edge
    threshold: float = 0.0  # cascade: lowest confidence the edge answers itself
    cloud_model: str = ""  # cascade: the model the cloud answers with (default: the same)

    def edge_stages(self, num_stages: int) -> int:
        """How many stages run at the edge before anything goes up (cascade: all)."""
        if self.mode == "cloud":
            return 0
        if self.mode == "split":
            return self.split
        return num_stages

    def gauge(self, num_stages: int) -> int:
        return -1 if self.mode == "cascade" else self.edge_stages(num_stages)

    def __str__(self) -> str:
        if self.mode == "split":
            return f"split:{self.split}"
        if self.mode == "cascade":
            return f"cascade:{self.threshold:g}" + (f":{self.cloud_model}" if self.cloud_model else "")
        return self.mode


EDGE = Placement("edge")


def parse(model: str, text: str) -> Placement:
    """A placement for zoo model `model`; ValueError saying what is wrong otherwise."""
    _, stages = staged.describe(model)  # KeyError for a model the zoo does not have
    mode, _, rest = text.partition(":")
    if mode in ("edge", "cloud") and not rest:
        return Placement(mode)
    if mode == "split":
        try:
            k = int(rest)
        except ValueError:
            raise ValueError(f"{model}: split needs a stage count, as in split:1 (got {text!r})") from None
        if not 0 <= k <= len(stages):
            raise ValueError(f"{model}: split:{k} is out of range; {model} has {len(stages)} stages")
        return Placement("edge") if k == len(stages) else Placement("cloud") if k == 0 else Placement("split", split=k)
    if mode == "cascade":
        threshold, _, cloud_model = rest.partition(":")
        try:
            t = float(threshold)
        except ValueError:
            raise ValueError(f"{model}: cascade needs a confidence threshold, as in cascade:0.9 (got {text!r})") from None
        if not 0 <= t <= 1.01:
            raise ValueError(f"{model}: cascade threshold {t} is outside 0..1 (above 1 sends everything up)")
        if cloud_model:
            if tasks.get(cloud_model).task.output != tasks.get(model).task.output:
                raise ValueError(f"{model}: {cloud_model} predicts different classes and cannot back it up")
        return Placement("cascade", threshold=t, cloud_model=cloud_model)
    raise ValueError(f"{model}: unknown placement {text!r}; use edge, cloud, split:K or cascade:T[:CLOUD_MODEL]")


def parse_all(items: list[str]) -> dict[str, Placement]:
    """`MODEL=MODE` items (the --placement flags) as a map; later items win."""
    placements: dict[str, Placement] = {}
    for item in items:
        model, sep, text = item.partition("=")
        if not sep or not model:
            raise ValueError(f"placement {item!r} is not MODEL=MODE")
        placements[model] = parse(model, text)
    return placements
