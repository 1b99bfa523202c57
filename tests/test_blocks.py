import torch

from lpvit_compiler.blocks import BlockGrid


def test_partial_edge_blocks_count_only_real_elements():
    grid = BlockGrid(40, 50, (16, 16))
    assert (grid.block_rows, grid.block_cols, grid.num_blocks) == (3, 4, 12)
    counts = grid.element_counts()
    assert counts[0, 0] == 256 and counts[2, 3] == 8 * 2 and counts.sum() == 40 * 50
    ones = torch.ones(40, 50)
    assert torch.equal(grid.block_mean(ones), torch.ones(3, 4))


def test_expand_and_reduce_round_trip():
    grid = BlockGrid(40, 50, (16, 32))
    block_mask = torch.tensor([[True, False], [False, True], [True, True]])
    element_mask = grid.expand(block_mask)
    assert element_mask.shape == (40, 50)
    assert element_mask[:16, :32].all() and not element_mask[:16, 32:].any() and element_mask[32:, :].all()
    assert torch.equal(grid.reduce_any(element_mask), block_mask)


def test_as_blocks_matches_slicing():
    grid = BlockGrid(40, 50, (16, 16))
    w = torch.randn(40, 50)
    blocks = grid.as_blocks(w)
    assert torch.equal(blocks[1, 2], w[16:32, 32:48])
    assert torch.equal(blocks[2, 3][:8, :2], w[32:40, 48:50]) and not blocks[2, 3][8:].any()
