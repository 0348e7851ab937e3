"""The noise stream (docs/DESIGN.md, Noise): Philox4x32-10 words and the float32 Box–Muller normals.

The words are checked exactly, against the published known-answer vectors and against an
independent pure-numpy Philox4x32-10 written here; the normals against a float64 Box–Muller of the
same float32 u1 and the exact angle 2 pi w_b / 2^32, to within ULP_MAX units in the last place of
float32 (csrc/philox.h: at most 3.98 ulps over 4 * 10^7 normals); the statistics of 10^7 draws
against N(0, 1) with tolerances of about five standard errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import thermo_ext
from thermo_ext.random import normal, philox

MASK32 = np.uint64(0xFFFFFFFF)

# ---------------------------------------------------------------------------------------------
# An independent Philox4x32-10 and Box–Muller (numpy, uint64 arithmetic), written from docs/DESIGN.md, Noise.
# ---------------------------------------------------------------------------------------------


def np_philox(counter, key):
    """Philox4x32-10 of counters (..., 4) and keys (..., 2) (broadcast) as uint64 words (..., 4)."""
    c = np.asarray(counter, dtype=np.uint64)
    k = np.asarray(key, dtype=np.uint64)
    shape = np.broadcast_shapes(c.shape[:-1], k.shape[:-1])
    c = np.broadcast_to(c, shape + (4,))
    k = np.broadcast_to(k, shape + (2,))
    c0, c1, c2, c3 = (c[..., j].copy() for j in range(4))
    k0, k1 = k[..., 0].copy(), k[..., 1].copy()
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    w0, w1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    s32 = np.uint64(32)
    for _ in range(10):
        p0 = m0 * c0  # both factors < 2**32: the uint64 product is exact
        p1 = m1 * c2
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ k0, p1 & MASK32, (p0 >> s32) ^ c3 ^ k1, p0 & MASK32
        k0 = (k0 + w0) & MASK32
        k1 = (k1 + w1) & MASK32
    return np.stack([c0, c1, c2, c3], axis=-1)


def np_words(n, *, seed, uid, step, draw, offset=0):
    """The Philox words of the blocks of elements offset .. offset+n-1, and their global indices."""
    i = np.arange(offset, offset + n, dtype=np.uint64)
    counter = np.stack([(i >> np.uint64(2)) & MASK32, np.full_like(i, uid),
                        np.full_like(i, step % 2**32), np.full_like(i, draw)], axis=-1)
    key = np.array([seed % 2**32, seed >> 32], dtype=np.uint64)
    return i, np_philox(counter, key)


def np_normal(n, *, seed, uid, step, draw, offset=0):
    """The normals of docs/DESIGN.md, Noise, in float64, from the float32 uniform u1 and the
    angle of w_b."""
    i, w = np_words(n, seed=seed, uid=uid, step=step, draw=draw, offset=offset)
    lane = i & np.uint64(3)
    low = lane < 2
    wa = np.where(low, w[:, 0], w[:, 2])
    wb = np.where(low, w[:, 1], w[:, 3])
    # float32 arithmetic exactly as written: w*2^-32 is exact (power of two), "+ 2^-33" rounds.
    u1 = wa.astype(np.float32) * np.float32(2.0**-32) + np.float32(2.0**-33)
    assert u1.dtype == np.float32
    r = np.sqrt(-2.0 * np.log(u1.astype(np.float64)))
    # the angle 2 pi w_b / 2^32 from its nearest quarter turn q (exact integer arithmetic), so
    # that the zeros of cos and sin are exact
    q = ((wb + np.uint64(2**29)) >> np.uint64(30)) & np.uint64(3)
    rest = (wb.astype(np.int64) - (q.astype(np.int64) << 30) + 2**31) % 2**32 - 2**31
    ang = 2.0 * np.pi * (rest.astype(np.float64) * 2.0**-32)  # exact scaling, |ang| <= pi/4
    c, s = np.cos(ang), np.sin(ang)
    cos = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    sin = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    return np.where(lane % np.uint64(2) == 0, r * cos, r * sin)


#: The largest error of a normal, in units in the last place of float32 at the exact value
#: (np.spacing of its float32 rounding); csrc/philox.h's polynomials give at most 3.98.
ULP_MAX = 4.5


def ulps(got, want):
    """|got - want| in float32 ulps of want (want float64; an exact 0 must come out as 0)."""
    got = np.asarray(got, dtype=np.float64)
    spacing = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return np.abs(got - want) / spacing


def te_words(counter, key):
    return philox(counter, key).numpy().astype(np.uint64)


# ---------------------------------------------------------------------------------------------
# Philox words
# ---------------------------------------------------------------------------------------------

KAT = [
    # (counter, key, words): Random123's kat_vectors for philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,words", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, words):
    got = philox(counter, key)
    assert got.dtype == torch.int64 and tuple(got.shape) == (4,)
    assert tuple(int(x) for x in got) == words


@pytest.mark.parametrize("counter,key,words", KAT, ids=["zeros", "ones", "pi"])
def test_numpy_philox_known_answers(counter, key, words):
    # the independent implementation the rest of this file relies on is itself right
    assert tuple(int(x) for x in np_philox(counter, key)) == words


def test_philox_words_match_numpy_on_random_counters():
    rng = np.random.default_rng(7)
    counters = rng.integers(0, 2**32, size=(2000, 4), dtype=np.uint64)
    keys = rng.integers(0, 2**32, size=(2000, 2), dtype=np.uint64)
    got = te_words(torch.from_numpy(counters.astype(np.int64)),
                   torch.from_numpy(keys.astype(np.int64)))
    np.testing.assert_array_equal(got, np_philox(counters, keys))


def test_philox_broadcasts_key_and_leading_dims():
    rng = np.random.default_rng(8)
    counters = rng.integers(0, 2**32, size=(3, 5, 4), dtype=np.uint64)
    key = np.array([0xDEADBEEF, 0x12345678], dtype=np.uint64)
    got = philox(torch.from_numpy(counters.astype(np.int64)), key.astype(np.int64).tolist())
    assert tuple(got.shape) == (3, 5, 4)
    np.testing.assert_array_equal(got.numpy().astype(np.uint64), np_philox(counters, key))


@pytest.mark.parametrize("counter,key,name,exc", [
    ((0, 0, 0), (0, 0), "counter", ValueError),
    ((0, 0, 0, 0), (0, 0, 0), "key", ValueError),
    ((0, 0, 0, 2**32), (0, 0), "counter", ValueError),
    ((0, 0, -1, 0), (0, 0), "counter", ValueError),
    ((0, 0, 0, 0), (2**32, 0), "key", ValueError),
    ((0, 0, 0, 0), (0, -1), "key", ValueError),
])
def test_philox_rejects_bad_input(counter, key, name, exc):
    with pytest.raises(exc, match=name):
        philox(counter, key)


# ---------------------------------------------------------------------------------------------
# Normals against the independent implementation
# ---------------------------------------------------------------------------------------------

NORMAL_CASES = [
    # n, seed, uid, step, draw, offset
    (1, 0, 0, 0, 0, 0),
    (2, 1, 0, 0, 0, 1),
    (3, 12345, 7, 3, 1, 0),
    (5, 12345, 7, 3, 1, 2),
    (7, 99, 1, 0, 0, 3),
    (16, 2**32 + 5, 0, 1, 0, 0),
    (4097, 2**40 + 17, (3 << 16) | 5, 11, 2, 5),
    (70001, 2**63 + 2**35 + 9, (1 << 16) | 2, 2**32 + 7, 1, 131071),  # parallel path, wrap
    (257, 2**64 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**33 + 6),
    (1000, 0x0123456789ABCDEF, 65535, 2**40 + 3, 0xFFFF, 4 * 2**30 - 2),
]


@pytest.mark.parametrize("n,seed,uid,step,draw,offset", NORMAL_CASES)
def test_normal_matches_independent_box_muller(n, seed, uid, step, draw, offset):
    got = normal(n, seed=seed, uid=uid, step=step, draw=draw, offset=offset)
    assert got.dtype == torch.float32 and tuple(got.shape) == (n,)
    want = np_normal(n, seed=seed, uid=uid, step=step, draw=draw, offset=offset)
    assert ulps(got.numpy(), want).max() <= ULP_MAX


@pytest.mark.parametrize("n,seed,uid,step,draw,offset", NORMAL_CASES)
def test_normal_words_are_the_philox_words(n, seed, uid, step, draw, offset):
    # The words behind the normals, through the package's own philox(), equal numpy's exactly.
    i, want = np_words(n, seed=seed, uid=uid, step=step, draw=draw, offset=offset)
    blocks = np.unique(i >> np.uint64(2))
    counter = np.stack([blocks & MASK32, np.full_like(blocks, uid),
                        np.full_like(blocks, step % 2**32), np.full_like(blocks, draw)], axis=-1)
    key = [seed % 2**32, seed >> 32]
    got = te_words(torch.from_numpy(counter.astype(np.int64)), key)
    np.testing.assert_array_equal(got, np_philox(counter, np.array(key, dtype=np.uint64)))


def test_normal_n_zero():
    z = normal(0, seed=1, uid=2, step=3, draw=4, offset=5)
    assert z.dtype == torch.float32 and tuple(z.shape) == (0,)


def test_normal_step_wraps_mod_2_32():
    a = normal(1003, seed=77, uid=3, step=5, draw=1, offset=2)
    b = normal(1003, seed=77, uid=3, step=5 + 2**32, draw=1, offset=2)
    c = normal(1003, seed=77, uid=3, step=5 + 7 * 2**32, draw=1, offset=2)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_normal_seed_uses_both_key_words():
    a = normal(64, seed=5, uid=0, step=0, draw=0)
    b = normal(64, seed=5 + 2**32, uid=0, step=0, draw=0)
    assert not torch.equal(a, b)
    want = np_normal(64, seed=5 + 2**32, uid=0, step=0, draw=0)
    assert ulps(b.numpy(), want).max() <= ULP_MAX


def test_normal_accepts_numpy_integers():
    a = normal(np.int64(9), seed=np.uint64(2**40), uid=np.int32(3), step=np.int64(4),
               draw=np.int64(1), offset=np.int64(2))
    b = normal(9, seed=2**40, uid=3, step=4, draw=1, offset=2)
    assert torch.equal(a, b)


def test_normal_pieces_equal_the_whole():
    # Element i's normal depends only on its global index: any split into pieces with offsets
    # gives the same numbers, bitwise (what sharding relies on). Pieces cross the engine's chunk
    # (2**15) and block boundaries at unaligned places.
    n = 3 * 2**15 + 123
    kw = dict(seed=2**33 + 1, uid=(2 << 16) | 1, step=9, draw=1)
    whole = normal(n, **kw)
    cuts = [0, 1, 2, 7, 4096, 4099, 2**15 - 1, 2**15 + 3, 2 * 2**15 + 2, n - 5, n]
    pieces = [normal(b - a, offset=a, **kw) for a, b in zip(cuts[:-1], cuts[1:])]
    assert torch.equal(torch.cat(pieces), whole)


def test_normal_bitwise_across_thread_counts(restore_threads):
    kw = dict(seed=31337, uid=5, step=2, draw=0, offset=3)
    restore_threads(1)
    one = normal(2**17 + 5, **kw)
    restore_threads(2)
    two = normal(2**17 + 5, **kw)
    assert torch.equal(one, two)


@pytest.mark.parametrize("arg,value,exc", [
    ("seed", -1, ValueError), ("seed", 2**64, ValueError), ("seed", 1.0, TypeError),
    ("seed", "1", TypeError), ("seed", True, TypeError),
    ("uid", -1, ValueError), ("uid", 2**32, ValueError), ("uid", 0.5, TypeError),
    ("draw", -1, ValueError), ("draw", 2**32, ValueError), ("draw", None, TypeError),
    ("offset", -1, ValueError), ("offset", 2**62, ValueError), ("offset", 2.0, TypeError),
    ("step", -1, ValueError), ("step", 2**64, ValueError), ("step", 1.5, TypeError),
    ("n", -1, ValueError), ("n", 2**62, ValueError), ("n", 4.0, TypeError),
])
def test_normal_rejects_bad_arguments(arg, value, exc):
    kw = dict(n=4, seed=1, uid=0, step=0, draw=0, offset=0)
    kw[arg] = value
    n = kw.pop("n")
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        normal(n, **kw)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

N_STAT = 10**7
K_SIGMA = 5.0


@pytest.fixture(scope="module")
def big_sample():
    return normal(N_STAT, seed=20240601, uid=(1 << 16) | 3, step=17, draw=1,
                  offset=1).numpy().astype(np.float64)


def test_ten_million_draws_within_ulp_max_of_float64(big_sample):
    # every normal of the sample against the float64 Box–Muller of its words: the polynomials'
    # accuracy where it is worst (|z| near 0 included: the error is relative there too)
    want = np_normal(N_STAT, seed=20240601, uid=(1 << 16) | 3, step=17, draw=1, offset=1)
    err = ulps(big_sample, want)
    assert err.max() <= ULP_MAX, (err.max(), int(err.argmax()))
    assert err.mean() < 0.6, err.mean()  # 0.53 measured: most normals are within one rounding


def test_moments_of_ten_million_draws(big_sample):
    z = big_sample
    n = z.size
    assert np.isfinite(z).all()
    mean = z.mean()
    c = z - mean
    m2 = np.mean(c * c)
    m4 = np.mean((c * c) ** 2)
    # standard errors of N(0,1) estimates: mean 1/sqrt(n), variance sqrt(2/n), kurtosis sqrt(24/n)
    assert abs(mean) < K_SIGMA / math.sqrt(n), mean
    assert abs(m2 - 1.0) < K_SIGMA * math.sqrt(2.0 / n), m2
    assert abs(m4 / m2**2 - 3.0) < K_SIGMA * math.sqrt(24.0 / n), m4 / m2**2
    # the skewness too: sqrt(6/n)
    assert abs(np.mean(c**3) / m2**1.5) < K_SIGMA * math.sqrt(6.0 / n)


def test_distribution_of_ten_million_draws(big_sample):
    from scipy import stats

    z = big_sample
    # 64 equiprobable bins of N(0,1): chi-square with 63 degrees of freedom
    edges = stats.norm.ppf(np.linspace(0.0, 1.0, 65)[1:-1])
    counts = np.bincount(np.searchsorted(edges, z), minlength=64)
    expect = z.size / 64
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert stats.chi2.sf(chi2, 63) > 1e-6, chi2
    # tails: P(|z| > 3) and P(|z| > 4.5) within five binomial standard errors
    for t in (3.0, 4.5):
        p = 2 * stats.norm.sf(t)
        k = np.count_nonzero(np.abs(z) > t)
        assert abs(k - z.size * p) < K_SIGMA * math.sqrt(z.size * p * (1 - p)) + 1, (t, k)


def test_lanes_are_uncorrelated(big_sample):
    # the even and odd lane of one word pair (cos, sin of one angle), the two pairs of a block,
    # and neighbouring blocks
    z = big_sample[: (big_sample.size // 8) * 8].reshape(-1, 8)
    tol = K_SIGMA / math.sqrt(z.shape[0])
    for a, b in [(0, 1), (2, 3), (0, 2), (1, 3), (1, 2), (3, 4), (0, 4)]:
        r = np.corrcoef(z[:, a], z[:, b])[0, 1]
        assert abs(r) < tol, (a, b, r)
    # r**2 of one pair is -2 ln u1, an exponential with mean 2: the radius is right
    r2 = z[:, 0] ** 2 + z[:, 1] ** 2
    assert abs(r2.mean() - 2.0) < K_SIGMA * 2.0 / math.sqrt(r2.size)


def test_different_coordinates_give_different_streams():
    n = 2**16
    base = dict(seed=4242, uid=(1 << 16) | 1, step=5, draw=0)
    ref = normal(n, **base).double()
    variants = [dict(base, uid=base["uid"] + 1), dict(base, uid=2 << 16 | 1),
                dict(base, step=6), dict(base, draw=1), dict(base, seed=4243),
                dict(base, seed=4242 + 2**32)]
    streams = [ref] + [normal(n, **v).double() for v in variants]
    tol = K_SIGMA / math.sqrt(n)
    for c in range(4):  # chunk by chunk, so a stream that repeats only partly is caught too
        sl = slice(c * n // 4, (c + 1) * n // 4)
        for a in range(len(streams)):
            for b in range(a + 1, len(streams)):
                x, y = streams[a][sl], streams[b][sl]
                assert not torch.equal(x, y), (a, b, c)
                r = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
                assert abs(r) < 2 * tol, (a, b, c, r)
    # and no stream is a shifted copy of the first: no run of four of its values recurs
    windows = [set(map(tuple, s.numpy().reshape(-1)[np.arange(n - 3)[:, None] + np.arange(4)]
                       .tolist())) for s in streams[1:]]
    for j in range(0, 256, 3):
        w = tuple(ref[j:j + 4].tolist())
        assert not any(w in ws for ws in windows), j


def test_build_info_lists_isas():
    info = thermo_ext.build_info()
    assert "baseline" in info["isas"] and info["isa"] in info["isas"]
