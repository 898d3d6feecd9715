"""The lesson's claims as data: every recipe builds on a tiny model, shares are of the dense model's
totals, the H200 figures resolve, and the verdict judges what it says it judges."""

import pytest
import torch

from course_lib import claims
from course_lib.evaluate import count_parameters
from course_lib.pruned_modeling import adapter_for

from tiny import wide_llama


def _scores(model):
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    g = torch.Generator().manual_seed(0)
    heads = torch.rand(len(blocks), adapter.num_heads(blocks[0]), generator=g)
    neurons = [torch.rand(model.config.intermediate_size, generator=g) for _ in blocks]
    return claims.Scores(torch.tensor([0.9, 0.1, 0.3, 0.8]), {"taylor": heads}, neurons)


def test_recipe_removes_layers_then_shares_of_the_dense_totals():
    model = wide_llama()
    pruned = claims.prune_variant(model, _scores(model), claims.Recipe(layers=1, heads=0.125, neurons=0.125),
                                   multiple=8)
    adapter = adapter_for(pruned)
    blocks = adapter.blocks(pruned)
    assert len(blocks) == 3  # the lowest block influence (layer 1) went
    assert sum(adapter.num_heads(b) for b in blocks) == 12 - 2  # an eighth of the dense model's 16 heads
    widths = [adapter.intermediate_size(b) for b in blocks]
    assert sum(widths) == 4 * 32 - 32 - 16  # the block's 32 neurons, then an eighth of 128
    assert widths[0] == widths[-1] == 32  # first and last blocks protected
    assert count_parameters(model) > count_parameters(pruned) and len(adapter_for(model).blocks(model)) == 4


def test_every_other_layer_and_bad_recipes():
    model = wide_llama()
    pruned = claims.prune_variant(model, _scores(model), claims.Recipe(layers="every_other"))
    assert len(adapter_for(pruned).blocks(pruned)) == 2
    with pytest.raises(ValueError, match="recipe.layers must be 'every_other' or an integer in \\[0, 3\\]"):
        claims.prune_variant(model, _scores(model), claims.Recipe(layers=4))
    with pytest.raises(ValueError, match="recipe.head_method='magnitude' has no scores; computed: taylor"):
        claims.prune_variant(model, _scores(model), claims.Recipe(heads=0.25, head_method="magnitude"))


def test_h200_figures_resolve_for_every_claim_that_names_one():
    for claim in claims.LESSON_TABLE:
        figure = claims.h200_speedup(claim)
        assert (figure is None) == (claim.h200 is None)
        assert figure is None or 0.5 < figure < 3
    assert claims.h200_speedup(claims.LESSON_TABLE[0]) == 0.97  # BERT-base heads -50%, 1 x 128


def test_verdict_judges_quality_only_where_the_source_pruned_without_training():
    untrained = claims.Claim("x", (0.95, 0.97), 1.2, "decoder", claims.Recipe(layers=2))
    assert claims.verdict(untrained, 0.945, 1.09) == "holds"
    assert claims.verdict(untrained, 0.93, 1.2) == "speed holds, quality does not"
    assert claims.verdict(untrained, 0.96, 1.0) == "quality holds, speed does not"
    assert claims.verdict(untrained, 0.5, 1.0) == "does not hold"
    trained = claims.Claim("y", (0.95, 0.97), 1.2, "encoder", claims.Recipe(layers=2), trained=True)
    assert claims.verdict(trained, 0.5, 1.2) == "speed holds; quality needs recovery (not judged)"
