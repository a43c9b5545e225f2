"""The screening rules of the exact engine: precisions, the margin rule, the key error bound and the
certificate, on NumPy or CuPy (``xp``).  The CPU engine (``exact.py``) and the GPU engine
(``device/brute.py``) both take them from here.

**Screening.**  An exact search ranks every base row ``b`` by a cheap key, keeps per query the
``pool`` smallest keys (``pool_size``), recomputes the pool's distances in float64 and keeps the
``k`` nearest.  The keys rank exactly as the distance does:

* l2: ``K(q, b) = |b - mu|^2 - 2 (q - mu).(b - mu)``, so ``|q - b|^2 = K(q, b) + |q - mu|^2`` with
  ``mu`` the centre of ``_rows.l2_centre`` (the keys' error then scales with the data's spread, not
  with its distance from the origin);
* ip and cosine: ``K(q, b) = -q.b``, so ``1 - q.b = K(q, b) + 1``.

**Precisions** (``PRECISIONS``): the GPU forms the products from inputs rounded to

==========  ===================================  ============================================
``fp16``    11 significant bits, scaled by a     tensor cores (H100/H200: ~990 TFLOP/s dense);
            power of two into fp16's range       the default (``DEFAULT_PRECISION``)
``bf16``    8 significant bits                   tensor cores, same rate, 8x coarser keys
``tf32``    11 bits, cuBLAS's rounding unknown:  tensor cores at half the fp16 rate
            counted as truncation (10 bits)
``fp32``    no rounding (SIMT FMA, cuBLAS        ~60 TFLOP/s; the CPU engine's and the redo's
            ``COMPUTE_32F_PEDANTIC``)
==========  ===================================  ============================================

always accumulated in float32.

**The bound** (``key_error_bound``).  Let ``u = 2^-24``, ``u_p`` and ``eta_p`` the unit roundoff
and the largest error of a subnormal (or flushed) input of the precision (``_ROUNDING``; ``eta_p``
in scaled units, divided by the scales ``s_q``, ``s_b`` of the query block and of the base), ``g =
d 2^-23 / (1 - d 2^-23)`` (float32 accumulation over ``d`` terms, adders that truncate allowed),
``N = |q - mu|`` and ``R`` the largest ``|b - mu|`` over the base (both in float64 from the float32
centred rows).  For a query and *any* base row, the screened l2 key differs from ``K`` by at most

    E = 2 (3u + 2u_p + u_p^2 + g (1 + u_p)^2) N R          centring (q - mu, b - mu in float32),
                                                          rounding to the precision, accumulation
      + (d + 5) u R^2                                     |b - mu|^2 summed in float32
      + u (R^2 + 2 (1 + u_p)^2 N R)                       the key's one rounding (fma)
      + 2 (1 + g) (1 + u_p) sqrt(d) (eta_p R / s_q + eta_p N / s_b) + 2 (1 + g) d eta_p^2 / (s_q s_b)
                                                          subnormal or flushed inputs
      + (d + 4) 2^-52 ((N + R)^2 + N^2)                   float64 rounding of the re-ranked
                                                          distance and of |q - mu|^2
      + 2^-120                                            a flushed key

times ``1 + 2^-20`` (second-order terms and the float64 evaluation of ``E`` itself).  Each line
comes from ``|x y - x' y'| <= (|dx| |y| + |x| |dy| + |dx| |dy|)`` summed over the ``d`` terms and
Cauchy-Schwarz (``sum |x_i y_i| <= |x| |y|``).  ip and cosine: ``N = |q|``, ``R`` the largest
``|b|``, no centring term, no ``R^2`` lines and no factor 2 on the product (``K = -q.b``).

**The certificate** (``certified``).  Let ``tau`` be the largest screened key in a query's pool:
every row left out has a screened key ``>= tau``, hence a true key ``>= tau - E`` and a distance
``>= tau - E + |q - mu|^2`` (l2; ``tau - E + 1`` for ip).  After the float64 re-rank, the ``k``
results are the true ``k`` nearest (ties by id included) when the ``k``-th re-ranked distance
``d_k`` satisfies ``d_k + 2E < tau + |q - mu|^2``.  One ``E`` is what the argument needs; the rule
asks for two, so that a tensor core whose internal accumulation is coarser than the ``g`` above
(its adders are not documented) is still covered up to a factor of two.  A pool holding every row
that can be returned is certified whatever its keys.  A row that fails is redone by the engine
with float32 screening and a pool twice as large, and again until it passes or the pool holds
every row (then nothing was left out).

**The margin rule** (``pool_size``): ``pool = min(available, k + max(lo, k // div))`` with ``(lo,
div)`` per precision in ``_MARGIN``: float32 keys are almost exact (8 and k/4), fp16 and tf32 keys
carry about ``4 u_p N R`` of noise (16 and k/2), bf16 8x more (32 and k).  The pool only decides
how often a row is redone, never the result: the rows redone on the shared data are reported by
the engines (``stats``) and in docs/architecture.md.
"""
from __future__ import annotations

import math

import numpy as np

from .device.arrays import bf16_bits

__all__ = ["PRECISIONS", "DEFAULT_PRECISION", "EXCLUDED_KEY", "pool_size", "check_precision", "power_of_two_scale",
           "to_storage", "storage_dtype", "key_error_bound", "certified"]

#: Screening precisions of the GPU engine (the CPU engine screens in float32: ``"fp32"``).
PRECISIONS = ("fp16", "bf16", "tf32", "fp32")
DEFAULT_PRECISION = "fp16"
#: Screening key of a base row excluded from a query (its own row in a k-NN graph). Finite, so that
#: padding (+inf) is never picked before a real row, and larger than any real key, so the excluded
#: row enters a pool only when every other row is in it.
EXCLUDED_KEY = np.float32(np.finfo(np.float32).max)

# (unit roundoff, largest error of a subnormal or flushed input in scaled units) of the screening
# inputs: fp16's subnormals are spaced 2^-24 (error 2^-25); bf16, tf32 and fp32 share float32's
# exponent range, and a flush to zero of anything below 2^-126 costs at most 2^-126.
_ROUNDING = {"fp16": (2.0**-11, 2.0**-25), "bf16": (2.0**-8, 2.0**-126), "tf32": (2.0**-10, 2.0**-126),
             "fp32": (0.0, 2.0**-126)}
# (lo, div): pool = k + max(lo, k // div) (module docstring, "The margin rule").
_MARGIN = {"fp32": (8, 4), "tf32": (16, 2), "fp16": (16, 2), "bf16": (32, 1)}
# fp16's largest finite value is 65504: scaled inputs stay below 2^15; the scales stay within
# 2^-100 .. 2^100, so their products (cuBLAS's alpha) are normal float32 numbers.
_SCALE_TARGET_LOG2 = 15
_SCALE_LIMIT_LOG2 = 100
_U32 = 2.0**-24
_U64 = 2.0**-53


def check_precision(precision):
    """``precision`` if it names a screening precision, else ValueError listing them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision


def pool_size(k, available, precision="fp32"):
    """Candidates screened per query for ``k`` results out of ``available`` rows (the margin rule)."""
    lo, div = _MARGIN[precision]
    return min(available, k + max(lo, k // div))


def power_of_two_scale(max_abs, precision):
    """The power of two (a Python float) that brings entries of magnitude up to ``max_abs`` into
    the screening storage's range: ``|x| * scale < 2^15`` for fp16 and bf16, 1 for tf32 and fp32
    (stored as float32)."""
    if precision in ("tf32", "fp32") or not max_abs > 0:
        return 1.0
    exponent = math.frexp(float(max_abs))[1]                      # max_abs < 2^exponent
    shift = min(max(_SCALE_TARGET_LOG2 - exponent, -_SCALE_LIMIT_LOG2), _SCALE_LIMIT_LOG2)
    return 2.0**shift


def key_error_bound(xp, precision, space, d, qnorm, radius, q_scale, b_scale):
    """float64 ``[nq]``: ``E`` of the module docstring for queries whose ``|q - mu|`` (ip: ``|q|``)
    are ``qnorm`` (float64 ``[nq]``, NumPy or CuPy as ``xp``) against a base of largest norm
    ``radius`` (float), rows of width ``d``, screened in ``precision`` with the scales ``q_scale``
    and ``b_scale`` (floats)."""
    up, eta = _ROUNDING[precision]
    acc = d * 2.0**-23 / (1.0 - d * 2.0**-23)
    n = xp.asarray(qnorm, dtype=xp.float64)
    r = float(radius)
    sub = (2.0 * (1.0 + acc) * (1.0 + up) * math.sqrt(d) * (eta / q_scale * r + eta / b_scale * n)
           + 2.0 * (1.0 + acc) * d * eta * eta / (q_scale * b_scale))
    if space == "l2":
        bound = (2.0 * (3.0 * _U32 + 2.0 * up + up * up + acc * (1.0 + up) ** 2) * n * r
                 + (d + 5) * _U32 * r * r
                 + _U32 * (r * r + 2.0 * (1.0 + up) ** 2 * n * r)
                 + sub
                 + (d + 4) * 2.0 * _U64 * ((n + r) ** 2 + n * n))
    else:
        bound = ((2.0 * up + up * up + acc * (1.0 + up) ** 2) * n * r + sub
                 + (d + 4) * 2.0 * _U64 * (1.0 + n * r))
    return (bound + 2.0**-120) * (1.0 + 2.0**-20)


def certified(xp, space, kth, tau, qnorm, bound):
    """bool ``[nq]``: the certificate of the module docstring.  ``kth``: the k-th re-ranked distance
    (float64 ``[nq]``), ``tau``: the largest screened key of each pool (``[nq]``; +inf where the
    pool is not full), ``qnorm``: ``|q - mu|`` (l2; ignored otherwise), ``bound``: ``E``."""
    floor = xp.asarray(tau, dtype=xp.float64) + (xp.asarray(qnorm, dtype=xp.float64) ** 2 if space == "l2"
                                                 else 1.0)
    return xp.asarray(kth, dtype=xp.float64) + 2.0 * bound < floor


def to_storage(xp, x, precision, scale=1.0):
    """The screening inputs of the rows ``x`` (float32 ``[..., d]``, NumPy or CuPy as ``xp``):
    ``x * scale`` (``power_of_two_scale``: exact) rounded to nearest, ties to even, to float16
    (``fp16``) or to bfloat16 bit patterns in uint16 (``bf16``: CuPy has no bfloat16 type), or
    float32 as it is (``tf32``, whose rounding cuBLAS does, and ``fp32``)."""
    x = xp.asarray(x, dtype=xp.float32)
    if scale != 1.0:
        x = x * xp.float32(scale)
    if precision == "fp16":
        return x.astype(xp.float16)
    if precision == "bf16":
        return bf16_bits(x, xp)
    return xp.ascontiguousarray(x)


def storage_dtype(precision):
    """NumPy dtype of ``to_storage``'s output for ``precision``: float16, uint16 (bf16 bit patterns)
    or float32 (tf32, fp32)."""
    return {"fp16": np.float16, "bf16": np.uint16}.get(precision, np.float32)
