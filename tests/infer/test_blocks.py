"""The KV-cache block pool (hpcllm.infer.blocks): prefixes found by their tokens, blocks shared and
released, the least recently used prefix evicted first, and the pool grown only when nothing is free."""

import torch

from hpcllm.infer.blocks import BlockPool
from hpcllm.model.paged import SCRATCH, PagedKVCache

BS = 4


def pool(n_blocks=9, max_blocks=64, share=True) -> BlockPool:
    return BlockPool(PagedKVCache(1, 1, 2, n_blocks, BS, "cpu"), max_blocks, share)


def test_a_prompt_prefix_is_found_by_its_tokens_and_shared_read_only():
    p = pool()
    a, cached = p.admit(list(range(10)))  # 2 full blocks named, 1 partial
    assert cached == 0 and len(a) == 3 and SCRATCH not in a
    b, cached = p.admit(list(range(8)) + [99, 98, 97])  # same first 8 tokens: 2 blocks shared
    assert cached == 8 and b[:2] == a[:2] and b[2] != a[2]
    c, cached = p.admit([0, 1, 2, 3, 4, 5, 6, 99, 8, 9])  # differs in block 1: only block 0 shared
    assert cached == 4 and c[0] == a[0] and c[1] not in a
    assert p.refs[a[0]] == 3 and p.refs[a[1]] == 2
    assert p.reused_tokens == 12


def test_the_last_prompt_token_is_always_computed():
    p = pool()
    p.admit(list(range(8)))
    again, cached = p.admit(list(range(8)))  # both blocks named, but the last token's logits are needed
    assert cached == 4 and len(again) == 2


def test_released_prefixes_stay_until_their_memory_is_needed_oldest_first():
    p = pool(n_blocks=5)  # scratch + 4
    first, _ = p.admit(list(range(4)) + [50])  # a named block + a partial one
    p.release(first)
    assert p.held == 0 and list(p.evictable) == [first[0]]
    _, cached = p.admit(list(range(4)) + [60])  # found again after its row finished
    assert cached == 4
    p.release(_)
    second, _ = p.admit([7] * 5)  # a second named prefix
    p.release(second)
    assert list(p.evictable) == [first[0], second[0]]
    # three blocks wanted, two free: the least recently used prefix goes, the other stays
    p.admit([9] * 9)
    assert first[0] not in p.evictable and second[0] in p.evictable
    assert p.cache.n_blocks == 5
    assert p.admit(list(range(4)) + [1])[1] == 0  # its prefix is gone


def test_the_pool_grows_when_nothing_is_free_and_keeps_what_it_holds():
    p = pool(n_blocks=3)
    blocks, _ = p.admit(list(range(8)))
    p.cache.k[0, blocks[0]] = 7.0
    more, _ = p.admit([5] * 8)  # 2 more blocks than the pool has
    assert p.cache.n_blocks == 6 and len(set(blocks + more)) == 4
    assert torch.all(p.cache.k[0, blocks[0]] == 7.0)
    p.release(blocks + more)
    assert p.held == 0 and p.peak_held == 4


def test_without_sharing_nothing_is_named_or_found():
    p = pool(share=False)
    a, _ = p.admit(list(range(9)))
    b, cached = p.admit(list(range(9)))
    assert cached == 0 and not set(a) & set(b) and not p.block_named
    p.release(a + b)
    assert not p.evictable and p.held == 0


def test_forgetting_prefixes_frees_their_blocks():
    p = pool()
    a, _ = p.admit(list(range(9)))
    p.release(a)
    p.forget_prefixes()
    assert not p.block_named and not p.evictable
    assert p.admit(list(range(9)))[1] == 0


def test_a_prompt_reading_blocks_still_being_written_is_told_so():
    p = pool()
    assert not p.reads_pending(list(range(9)))
    p.admit(list(range(9)))  # names blocks 0-3 and 4-7: their keys come with the next forward
    assert p.reads_pending(list(range(8)) + [50]) and not p.reads_pending([7] * 9)
    p.written()
    assert not p.reads_pending(list(range(8)) + [50])
