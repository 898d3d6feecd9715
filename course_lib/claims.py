"""The lesson's benchmark claims as data, and one way to measure each on the course's own models.

The lesson closes with a table of published pruning results ("BERT-base, 50% of heads, 99.0%
retained, 1.4x") and a table of what each granularity typically buys. A learner cannot run
BERT-large or LLaMA-2-13B on a laptop, but can run the same *recipe* on MiniLM (BERT family) and
SmolLM2 (Llama family) and see whether the shape of the claim survives. Each claim here names its
recipe (how many layers, which share of heads and neurons, which score), the course model that
stands in for the paper's, and where the H200 file measured a comparable shape; notebook 09
prints them side by side with a verdict.

Quality "retained" is the pruned model's accuracy over the dense one's: sentiment accuracy for
MiniLM, next-token accuracy on held-out prose for SmolLM2 (the closest a causal LM gets to the
papers' zero-shot accuracies; perplexity is shown next to it). Nothing is recovered: the
variants show what pruning alone costs, and notebook 06 measured how much recovery wins back.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SettingError
from .plan import PruningPlan
from .pruned_modeling import adapter_for
from .selection import select_heads, select_layers, select_neurons
from .surgery import apply_plan

SPEED_TOLERANCE = 0.9  # a speedup "holds" if the measured one reaches 90% of the claim
QUALITY_TOLERANCE = 0.01  # and the quality if retained is at most one point below the claim's low end


@dataclass(frozen=True)
class Recipe:
    """What a variant removes from its dense model, all selected from precomputed scores.

    ``layers``: a count of lowest-block-influence blocks, or ``"every_other"`` (odd blocks, as
    BERT-of-Theseus's 6 of 12). ``heads`` and ``neurons``: shares of the dense model's query heads
    and MLP neurons, chosen globally among the blocks that stay.
    """

    layers: int | str = 0
    heads: float = 0.0
    neurons: float = 0.0
    head_method: str = "taylor"

    def label(self, n_layers: int) -> str:
        parts = []
        if self.layers == "every_other":
            parts.append(f"every other layer ({n_layers // 2} of {n_layers})")
        elif self.layers:
            parts.append(f"{self.layers} of {n_layers} layers")
        if self.heads:
            parts.append(f"{self.heads:.0%} heads ({self.head_method})")
        if self.neurons:
            parts.append(f"{self.neurons:.0%} neurons")
        return " + ".join(parts) or "dense"


@dataclass(frozen=True)
class Claim:
    """One row of the lesson's table: its words, its numbers, the course's stand-in."""

    lesson: str  # the row as the lesson states it
    retained: tuple[float, float]  # accuracy retained, low and high end (a single figure twice)
    speedup: float  # latency speedup claimed
    model: str  # "encoder" (MiniLM) or "decoder" (SmolLM2)
    recipe: Recipe
    h200: tuple[int, int, str, str] | None = None  # (section, table, row, column) of a comparable H200 figure
    h200_note: str = ""
    trained: bool = False  # the figure includes training after pruning (Voita et al., BERT-of-Theseus), or may:
    # the lesson's "combined approach" and "community results" rows do not say; pruning alone is not their test


LESSON_TABLE: tuple[Claim, ...] = (
    Claim("BERT-base, attention heads (Taylor), 50% heads: 99.0% (GLUE avg), 1.4x (Michel et al. 2019)",
          (0.99, 0.99), 1.4, "encoder", Recipe(heads=0.5),
          (2, 0, "1 x 128", "heads -50%"), "BERT-base shape, heads -50%, 1 x 128"),
    Claim("BERT-large, attention heads (magnitude), 30% heads: 99.2% (GLUE avg), 1.3x (Voita et al. 2019)",
          (0.992, 0.992), 1.3, "encoder", Recipe(heads=0.3, head_method="magnitude"),
          (2, 0, "1 x 128", "heads -25%"), "BERT-base shape, heads -25% (nearest), 1 x 128", trained=True),
    Claim("BERT-base, every other layer, 6/12 layers: 96.0% (GLUE avg), 1.85x (BERT-of-Theseus)",
          (0.96, 0.96), 1.85, "encoder", Recipe(layers="every_other"),
          (2, 0, "1 x 128", "layers 6/12"), "BERT-base shape, 6 of 12 layers, 1 x 128", trained=True),
    Claim("BERT-base, heads + neurons + layers, 25% each: 93-95%, 2.2x (combined approach)",
          (0.93, 0.95), 2.2, "encoder", Recipe(layers=2, heads=0.25, neurons=0.25),
          (2, 0, "1 x 128", "25% each (L, H, FFN)"), "BERT-base shape, 25% each, 1 x 128", trained=True),
    Claim("LLaMA-2-13B, layers (angular distance), 25% layers: 94-97% (0-shot), 1.25x (ShortGPT 2024)",
          (0.94, 0.97), 1.25, "decoder", Recipe(layers=8),
          (3, 0, "layers -25% (24)", "HF eager prefill 2048"), "Llama-2-7B shape, 24 of 32 layers, prefill 2048"),
    Claim("LLaMA-2-7B, layers (angular distance), 20% layers: 95-97%, 1.20x (ShortGPT 2024)",
          (0.95, 0.97), 1.20, "decoder", Recipe(layers=6),
          (3, 0, "layers -20% (26)", "HF eager prefill 2048"), "Llama-2-7B shape, 26 of 32 layers, prefill 2048"),
    Claim("Mistral-7B, layers (angular distance), 4/32 layers (12.5%): 97.5%, 1.14x (ShortGPT 2024)",
          (0.975, 0.975), 1.14, "decoder", Recipe(layers=4)),
    Claim("LLaMA-2-7B, heads + layers, 20% heads + 4 layers: 93-95%, 1.6x (community results)",
          (0.93, 0.95), 1.6, "decoder", Recipe(layers=4, heads=0.2),
          (3, 0, "20% L + 25% H + 30% FFN", "HF eager prefill 2048"),
          "Llama-2-7B shape, 20% layers + 25% heads + 30% FFN (nearest), prefill 2048", trained=True),
)


@dataclass(frozen=True)
class Level:
    """One row of the lesson's "three levels" table, with the recipe the course measures it by."""

    level: str
    removed: str  # the lesson's "typical fraction removed"
    speedup: tuple[float, float]
    cost: tuple[float, float]  # accuracy cost in points (fractions of 1)
    recipes: dict[str, Recipe] = field(default_factory=dict)  # per course model


THREE_LEVELS: tuple[Level, ...] = (
    Level("attention heads", "20-35% of heads", (1.15, 1.4), (0.005, 0.02),
          {"encoder": Recipe(heads=0.3), "decoder": Recipe(heads=0.3)}),
    Level("MLP neurons", "20-40% of neurons", (1.2, 1.6), (0.01, 0.03),
          {"encoder": Recipe(neurons=0.3), "decoder": Recipe(neurons=0.3)}),
    Level("layers", "15-25% of layers", (1.2, 1.8), (0.01, 0.04),
          {"encoder": Recipe(layers=1), "decoder": Recipe(layers=6)}),
    Level("combined", "all three", (2.0, 4.0), (0.03, 0.07),
          {"encoder": Recipe(layers=1, heads=0.3, neurons=0.3), "decoder": Recipe(layers=6, heads=0.3, neurons=0.3)}),
)


@dataclass
class Scores:
    """Everything a recipe selects from, computed once on the dense model."""

    block_influence: torch.Tensor  # [L]
    heads: dict[str, torch.Tensor]  # method -> [L, H]
    neurons: list[torch.Tensor]  # one [I] tensor per layer


def prune_variant(model: nn.Module, scores: Scores, recipe: Recipe, *, multiple: int = 64) -> nn.Module:
    """A pruned copy of ``model``: layers first, then heads and neurons among the blocks that stay.

    Head and neuron shares are of the *dense* model's totals, so "25% heads + 2 layers" removes a
    quarter of all heads, not a quarter of what the layers left. Scores are the dense model's,
    restricted to the surviving blocks (no re-scoring: a benchmark of recipes, not of iterative
    pruning). Widths stay multiples of ``multiple``; the first and last blocks keep their heads and
    neurons, as in notebook 03's rules.
    """
    if recipe.head_method not in scores.heads:
        raise SettingError(f"recipe.head_method={recipe.head_method!r} has no scores; computed: "
                           f"{', '.join(scores.heads)}", setting="head_method")
    adapter = adapter_for(model)
    n_layers = len(adapter.blocks(model))
    if recipe.layers == "every_other":
        gone = list(range(1, n_layers, 2))
    elif isinstance(recipe.layers, int) and 0 <= recipe.layers < n_layers:
        gone = select_layers(model, scores.block_influence, count=recipe.layers, protect_first=1,
                             protect_last=1).layers if recipe.layers else []
    else:
        raise SettingError(f"recipe.layers must be 'every_other' or an integer in [0, {n_layers - 1}], "
                           f"got {recipe.layers!r}", setting="layers")
    dense_heads = sum(adapter.num_heads(b) for b in adapter.blocks(model))
    dense_neurons = sum(s.numel() for s in scores.neurons)
    pruned = copy.deepcopy(model)
    if gone:
        apply_plan(pruned, PruningPlan(layers=gone))
    kept = [i for i in range(n_layers) if i not in set(gone)]
    rules = dict(protect_first=1, protect_last=1, multiple=multiple)
    if recipe.heads:
        plan = select_heads(pruned, scores.heads[recipe.head_method][kept], count=round(recipe.heads * dense_heads),
                            **rules)
        apply_plan(pruned, plan)
    if recipe.neurons:
        plan = select_neurons(pruned, [scores.neurons[i] for i in kept],
                              count=round(recipe.neurons * dense_neurons), **rules)
        apply_plan(pruned, plan)
    return pruned.eval()


def h200_speedup(claim: Claim) -> float | None:
    """The comparable figure of the H200 measurements file, or None where none was measured."""
    if claim.h200 is None:
        return None
    from .hardware import h200_table, parse_number

    section, index, row, column = claim.h200
    return parse_number(h200_table(section, index).row(row)[column])


def verdict(claim: Claim, retained: float, speedup: float) -> str:
    """"holds", or which half of the claim did not, by the module's stated tolerances.

    ``retained`` is measured without recovery, so the quality half is judged only for claims whose
    paper did not train after pruning (Michel et al., ShortGPT); for the others it is left open.
    """
    fast = speedup >= SPEED_TOLERANCE * claim.speedup
    if claim.trained:
        return ("speed holds" if fast else "speed does not hold") + "; quality needs recovery (not judged)"
    quality = retained >= claim.retained[0] - QUALITY_TOLERANCE
    if quality and fast:
        return "holds"
    if quality:
        return "quality holds, speed does not"
    if fast:
        return "speed holds, quality does not"
    return "does not hold"
