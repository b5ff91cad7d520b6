"""The shared batch plan: pure in (seed, step, micro), and data-parallel ranks split one global batch."""

import numpy as np

from textinv_cli.engine.batch_plan import BatchPlan, mix_seed


def _plan(**kw):
    args = dict(seed=7, n_images=5, batch_size=2, grad_accum=2, latent_shape=(4, 3, 3), num_timesteps=1000)
    args.update(kw)
    return BatchPlan(**args)


def test_draws_are_pure_functions_of_step_and_micro():
    a, b = _plan(), _plan()
    for step, micro in [(3, 1), (0, 0), (3, 1)]:
        da, db = a.draw(step, micro), b.draw(step, micro)
        for f in ("images", "caption_u", "flip_u", "eps", "noise", "timesteps"):
            np.testing.assert_array_equal(getattr(da, f), getattr(db, f))
    assert not np.array_equal(a.draw(0, 0).noise, a.draw(0, 1).noise)
    assert not np.array_equal(a.draw(0, 0).noise, _plan(seed=8).draw(0, 0).noise)


def test_every_image_once_per_epoch():
    plan = _plan(batch_size=1, grad_accum=1)
    seen = [int(plan.draw(s, 0).images[0]) for s in range(5)]
    assert sorted(seen) == list(range(5))


def test_two_ranks_see_what_one_process_sees_at_double_batch():
    one = _plan(batch_size=2, grad_accum=1)
    ranks = [_plan(batch_size=1, grad_accum=1, rank=r, world=2) for r in (0, 1)]
    for step in range(4):
        d = one.draw(step, 0)
        parts = [r.draw(step, 0) for r in ranks]
        for f in ("images", "caption_u", "flip_u", "eps", "noise", "timesteps"):
            np.testing.assert_array_equal(getattr(d, f), np.concatenate([getattr(p, f) for p in parts]))


def test_mix_seed_separates_neighbours():
    assert mix_seed(1, 2) != mix_seed(2, 1) and 0 <= mix_seed(1, 2) < 2**63
