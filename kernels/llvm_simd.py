"""SIMD integer dot products emitted as LLVM IR through numba ``@intrinsic``.

LLVM does not turn plain numba loops into ``vpmaddubsw``/``vpdpbusd`` code, so
these intrinsics write the vector code out. Each one computes the dot products
of ``NR`` consecutive weight rows with ``NT`` consecutive activation rows over a
range of 32-column groups and returns the ``NR * NT`` float sums (row-major:
``k * NT + u`` for row ``r0 + k`` and token ``t0 + u``).

Operands (see :class:`mer_cli.kernels.q4.QuantizedActivation`), all C-contiguous:

* q4 ``packed`` ``uint8 [R, C/2]`` (ggml Q4_0 nibble order), ``scales`` fp16 bits
  ``uint16 [R, C/32]``;
* q8 ``packed`` ``int8 [R, C]``;
* activations: ``lo``/``hi`` ``int8 [T, C/2]`` -- the int8 values that meet the
  low/high nibbles of the same packed bytes (``lo[16g+j] = xq[32g+j]``,
  ``hi[16g+j] = xq[32g+16+j]``); ``corr`` ``int32 [T, C/8]`` = -8 x the sum of
  the 8 activation bytes that land in each int32 lane (folds the q4 offset of
  8 into the integer accumulator); ``dl`` ``f32 [T, C/8]`` = the Q8 scale of
  the lane's group; ``q`` ``int8 [T, C]`` and ``d`` ``f32 [T, C/32]`` natural.

The VNNI intrinsics are only compiled when a kernel that uses them is first
called, which :mod:`mer_cli.kernels.cpu` allows only on CPUs that have VNNI
(LLVM cannot select ``vpdpbusd`` elsewhere).

numba's on-disk cache (``cache=True``) only watches the file of the jitted
function (``q4.py``, ``q8.py``): after editing this file, delete
``kernels/__pycache__/*.nbi`` / ``*.nbc`` or the old code keeps running.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

#: software-prefetch distance in bytes for the q4 weight stream (0: none):
#: AVX2 measured best at 2048 on the AMD dev machine (0-4096 tried); VNNI keeps
#: the calibration's 1024. numba's on-disk cache does not see changes here:
#: clear kernels/__pycache__ after editing.
PREFETCH_AVX2 = 2048
PREFETCH_VNNI = 1024

_i1 = ir.IntType(1)
_i8 = ir.IntType(8)
_i16 = ir.IntType(16)
_i32 = ir.IntType(32)
_f32 = ir.FloatType()
_half = ir.HalfType()


def _vec(t, n):
    return ir.VectorType(t, n)


class _Emitter:
    """Small helpers around an IRBuilder for the kernels below."""

    def __init__(self, context, builder, sig, args):
        self.c, self.b = context, builder
        self.sig, self.args = sig, args
        self.mod = builder.module

    def array(self, i):
        ty = self.sig.args[i]
        return cgutils.create_struct_proxy(ty)(self.c, self.b, value=self.args[i])

    def intp(self, i):
        return self.c.cast(self.b, self.args[i], self.sig.args[i], types.intp)

    def const(self, v):
        return ir.Constant(cgutils.intp_t, v)

    def fn(self, name, ret, argtys):
        return cgutils.get_or_insert_function(
            self.mod, ir.FunctionType(ret, argtys), name
        )

    def load(self, ptr, idx, vty):
        """Unaligned load of vector/scalar type ``vty`` at element ``idx`` of ``ptr``."""
        p = self.b.gep(ptr, [idx], inbounds=True)
        return self.b.load(self.b.bitcast(p, vty.as_pointer()), align=1)

    def halves_to_floats(self, ptr, idx, n):
        """``n`` fp16 bit patterns at ``ptr[idx:idx+n]`` widened to ``<n x float>``."""
        v = self.load(ptr, idx, _vec(_i16, n))
        return self.b.fpext(self.b.bitcast(v, _vec(_half, n)), _vec(_f32, n))

    def spread(self, v, n_in, each):
        """``<n_in x float>`` -> each element repeated ``each`` times."""
        mask = ir.Constant(
            _vec(_i32, n_in * each), [i // each for i in range(n_in * each)]
        )
        return self.b.shuffle_vector(v, ir.Constant(v.type, None), mask)

    def prefetcher(self, distance):
        """``pf(ptr, idx)``: prefetch ``distance`` bytes past ``ptr[idx]`` (no-op if 0).

        The weight stream is read once; a software prefetch a few hundred bytes
        ahead keeps more DRAM requests in flight than the rows' hardware
        prefetchers do on their own.
        """
        if distance <= 0:
            return lambda ptr, idx: None
        i8p = _i8.as_pointer()
        fn = self.fn("llvm.prefetch.p0i8", ir.VoidType(), [i8p, _i32, _i32, _i32])

        def pf(ptr, idx):
            p = self.b.gep(ptr, [self.b.add(idx, self.const(distance))])
            args = [ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)]
            self.b.call(fn, [self.b.bitcast(p, i8p), *args])

        return pf

    def hsum(self, v, n):
        tot = self.b.extract_element(v, ir.Constant(_i32, 0))
        for j in range(1, n):
            tot = self.b.fadd(tot, self.b.extract_element(v, ir.Constant(_i32, j)))
        return tot

    def accumulators(self, n, lanes):
        zero = ir.Constant(_vec(_f32, lanes), [0.0] * lanes)
        return [cgutils.alloca_once_value(self.b, zero) for _ in range(n)]

    def ret_tuple(self, vals):
        return self.c.make_tuple(self.b, self.sig.return_type, vals)


# ----------------------------------------------------------------------------- q4


def _q4_body(e, nr, nt, lanes):
    """Shared prologue of the q4 kernels: unpack operands.

    Signature: (packed, scales, r0, lo, hi, corr, dl, t0, g0, nchunk).
    """
    packed, scales = e.array(0), e.array(1)
    lo, hi, corr, dl = e.array(3), e.array(4), e.array(5), e.array(6)
    r0, t0, g0, nchunk = e.intp(2), e.intp(7), e.intp(8), e.intp(9)
    b = e.b
    half = b.extract_value(packed.shape, 1)  # bytes per row = C/2
    ngr = b.extract_value(scales.shape, 1)  # groups per row
    quarter = b.udiv(half, e.const(4))  # int32 lanes per activation row = C/8
    rows = [b.add(r0, e.const(k)) for k in range(nr)]
    toks = [b.add(t0, e.const(u)) for u in range(nt)]
    return {
        "pd": packed.data,
        "sd": scales.data,
        "lo": lo.data,
        "hi": hi.data,
        "corr": corr.data,
        "dl": dl.data,
        "wbase": [b.mul(r, half) for r in rows],
        "sbase": [b.mul(r, ngr) for r in rows],
        "xbase": [b.mul(t, half) for t in toks],
        "cbase": [b.mul(t, quarter) for t in toks],
        "g0": g0,
        "nchunk": nchunk,
        "accs": e.accumulators(nr * nt, lanes),
    }


def _emit_q4_avx2(e, nr, nt):
    """Chunks of 2 groups (64 weights, 32 packed bytes) with vpmaddubsw/vpmaddwd."""
    b = e.b
    o = _q4_body(e, nr, nt, 8)
    pf = e.prefetcher(PREFETCH_AVX2)
    v32i8, v16i16, v8i32, v8f = (
        _vec(_i8, 32),
        _vec(_i16, 16),
        _vec(_i32, 8),
        _vec(_f32, 8),
    )
    maddubs = e.fn("llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
    maddwd = e.fn("llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
    fma = e.fn("llvm.fma.v8f32", v8f, [v8f, v8f, v8f])
    m15 = ir.Constant(v32i8, [15] * 32)
    sh4 = ir.Constant(v32i8, [4] * 32)
    ones = ir.Constant(v16i16, [1] * 16)
    with cgutils.for_range(b, o["nchunk"]) as loop:
        g = b.add(o["g0"], b.mul(loop.index, e.const(2)))  # first group of the chunk
        off16 = b.mul(g, e.const(16))  # byte offset in packed row / lo / hi
        off4 = b.mul(g, e.const(4))  # lane offset in corr / dl
        xs = []
        for u in range(nt):
            xo = b.add(o["xbase"][u], off16)
            co = b.add(o["cbase"][u], off4)
            xs.append(
                (
                    e.load(o["lo"], xo, v32i8),
                    e.load(o["hi"], xo, v32i8),
                    e.load(o["corr"], co, v8i32),
                    e.load(o["dl"], co, v8f),
                )
            )
        for k in range(nr):
            pf(o["pd"], b.add(o["wbase"][k], off16))
            w = e.load(o["pd"], b.add(o["wbase"][k], off16), v32i8)
            wl = b.and_(w, m15)
            wh = b.lshr(w, sh4)
            s = e.spread(e.halves_to_floats(o["sd"], b.add(o["sbase"][k], g), 2), 2, 4)
            for u, (xl, xh, cr, dxl) in enumerate(xs):
                p = b.add(b.call(maddubs, [wl, xl]), b.call(maddubs, [wh, xh]))
                i = b.add(b.call(maddwd, [p, ones]), cr)
                acc = o["accs"][k * nt + u]
                m = b.fmul(s, dxl)
                b.store(b.call(fma, [b.sitofp(i, v8f), m, b.load(acc)]), acc)
    return [e.hsum(b.load(a), 8) for a in o["accs"]]


def _emit_q4_avx2_g8(e, nr, nt):
    """Chunks of 8 groups (256 weights, 128 packed bytes) with vpmaddubsw, then
    ``vphaddw`` twice and ``vpmaddwd`` fold the four int16 vectors into one int32
    lane per group, so the float work (offset, convert, scale, FMA) is done once
    per 8 groups.

    Signature: (packed, scales, r0, lo, hi, gsum, d, t0, g0, nchunk) -- the
    offset uses ``gsum`` and the scale ``d`` per group, not ``corr``/``dl``.
    """
    b = e.b
    packed, scales = e.array(0), e.array(1)
    lo, hi, gsum, d = e.array(3), e.array(4), e.array(5), e.array(6)
    r0, t0, g0, nchunk = e.intp(2), e.intp(7), e.intp(8), e.intp(9)
    half = b.extract_value(packed.shape, 1)
    ngr = b.extract_value(scales.shape, 1)
    wbase = [b.mul(b.add(r0, e.const(k)), half) for k in range(nr)]
    sbase = [b.mul(b.add(r0, e.const(k)), ngr) for k in range(nr)]
    xbase = [b.mul(b.add(t0, e.const(u)), half) for u in range(nt)]
    gbase = [b.mul(b.add(t0, e.const(u)), ngr) for u in range(nt)]
    accs = e.accumulators(nr * nt, 8)
    pf = e.prefetcher(PREFETCH_AVX2)
    v32i8, v16i16, v8i32, v8f = (
        _vec(_i8, 32),
        _vec(_i16, 16),
        _vec(_i32, 8),
        _vec(_f32, 8),
    )
    maddubs = e.fn("llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
    maddwd = e.fn("llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
    phaddw = e.fn("llvm.x86.avx2.phadd.w", v16i16, [v16i16, v16i16])
    fma = e.fn("llvm.fma.v8f32", v8f, [v8f, v8f, v8f])
    m15 = ir.Constant(v32i8, [15] * 32)
    sh4 = ir.Constant(v32i8, [4] * 32)
    ones = ir.Constant(v16i16, [1] * 16)
    sh3 = ir.Constant(v8i32, [3] * 8)
    # after the phadds lanes hold groups [0 2 4 6 | 1 3 5 7]; put them in order
    order = ir.Constant(_vec(_i32, 8), [0, 4, 1, 5, 2, 6, 3, 7])
    with cgutils.for_range(b, nchunk) as loop:
        g = b.add(g0, b.mul(loop.index, e.const(8)))
        off16 = b.mul(g, e.const(16))
        # Chunk-major order with the pair sums folded as soon as two chunks are
        # done keeps few vectors live per (row, token), so blocks of several
        # rows and tokens stay in registers.
        pairs = [(k, u) for k in range(nr) for u in range(nt)]
        prev = {}  # (k, u) -> int16 vector of the chunk before (even chunks)
        half_sums = {pair: [] for pair in pairs}
        for c in range(4):
            ws = []
            for k in range(nr):
                wo = b.add(wbase[k], b.add(off16, e.const(32 * c)))
                if c % 2 == 0:
                    pf(packed.data, wo)
                w = e.load(packed.data, wo, v32i8)
                ws.append((b.and_(w, m15), b.lshr(w, sh4)))
            for u in range(nt):
                xo = b.add(xbase[u], b.add(off16, e.const(32 * c)))
                xl = e.load(lo.data, xo, v32i8)
                xh = e.load(hi.data, xo, v32i8)
                for k, (wl, wh) in enumerate(ws):
                    # int16 lanes of 4 products each: |.| <= 4 * 15 * 127 = 7620
                    p = b.add(b.call(maddubs, [wl, xl]), b.call(maddubs, [wh, xh]))
                    if c % 2 == 0:
                        prev[(k, u)] = p
                    else:
                        half_sums[(k, u)].append(b.call(phaddw, [prev[(k, u)], p]))
        s8 = [e.halves_to_floats(scales.data, b.add(sbase[k], g), 8) for k in range(nr)]
        for u in range(nt):
            go = b.add(gbase[u], g)
            off8 = b.shl(e.load(gsum.data, go, v8i32), sh3)  # 8 * sum(xq) per group
            d8 = e.load(d.data, go, v8f)
            for k in range(nr):
                h01, h23 = half_sums[(k, u)]
                # two rounds of int16 pair sums stay below 4 * 7620 = 30480 < 2**15
                h = b.call(maddwd, [b.call(phaddw, [h01, h23]), ones])  # 1 lane/group
                h = b.sub(b.shuffle_vector(h, ir.Constant(v8i32, None), order), off8)
                acc = accs[k * nt + u]
                m = b.fmul(s8[k], d8)
                b.store(b.call(fma, [b.sitofp(h, v8f), m, b.load(acc)]), acc)
    return [e.hsum(b.load(a), 8) for a in accs]


def _emit_q4_vnni(e, nr, nt):
    """Chunks of 4 groups (128 weights, 64 packed bytes) with vpdpbusd."""
    b = e.b
    o = _q4_body(e, nr, nt, 16)
    pf = e.prefetcher(PREFETCH_VNNI)
    v64i8, v16i32, v16f = _vec(_i8, 64), _vec(_i32, 16), _vec(_f32, 16)
    dpbusd = e.fn("llvm.x86.avx512.vpdpbusd.512", v16i32, [v16i32, v16i32, v16i32])
    fma = e.fn("llvm.fma.v16f32", v16f, [v16f, v16f, v16f])
    m15 = ir.Constant(v64i8, [15] * 64)
    sh4 = ir.Constant(v64i8, [4] * 64)
    with cgutils.for_range(b, o["nchunk"]) as loop:
        g = b.add(o["g0"], b.mul(loop.index, e.const(4)))
        off16 = b.mul(g, e.const(16))
        off4 = b.mul(g, e.const(4))
        xs = []
        for u in range(nt):
            xo = b.add(o["xbase"][u], off16)
            co = b.add(o["cbase"][u], off4)
            xs.append(
                (
                    b.bitcast(e.load(o["lo"], xo, v64i8), v16i32),
                    b.bitcast(e.load(o["hi"], xo, v64i8), v16i32),
                    e.load(o["corr"], co, v16i32),
                    e.load(o["dl"], co, v16f),
                )
            )
        for k in range(nr):
            pf(o["pd"], b.add(o["wbase"][k], off16))
            w = e.load(o["pd"], b.add(o["wbase"][k], off16), v64i8)
            wl = b.bitcast(b.and_(w, m15), v16i32)
            wh = b.bitcast(b.lshr(w, sh4), v16i32)
            s = e.spread(e.halves_to_floats(o["sd"], b.add(o["sbase"][k], g), 4), 4, 4)
            for u, (xl, xh, cr, dxl) in enumerate(xs):
                i = b.call(dpbusd, [cr, wl, xl])
                i = b.call(dpbusd, [i, wh, xh])
                acc = o["accs"][k * nt + u]
                m = b.fmul(s, dxl)
                b.store(b.call(fma, [b.sitofp(i, v16f), m, b.load(acc)]), acc)
    return [e.hsum(b.load(a), 16) for a in o["accs"]]


# ----------------------------------------------------------------------------- q8


def _q8_body(e, nr, nt, lanes):
    """Signature: (packed, scales, r0, q, d, t0, g0, nchunk)."""
    packed, scales, q, d = e.array(0), e.array(1), e.array(3), e.array(4)
    r0, t0, g0, nchunk = e.intp(2), e.intp(5), e.intp(6), e.intp(7)
    b = e.b
    cols = b.extract_value(packed.shape, 1)
    ngr = b.extract_value(scales.shape, 1)
    rows = [b.add(r0, e.const(k)) for k in range(nr)]
    toks = [b.add(t0, e.const(u)) for u in range(nt)]
    return {
        "pd": packed.data,
        "sd": scales.data,
        "q": q.data,
        "d": d.data,
        "wbase": [b.mul(r, cols) for r in rows],
        "sbase": [b.mul(r, ngr) for r in rows],
        "xbase": [b.mul(t, cols) for t in toks],
        "dbase": [b.mul(t, ngr) for t in toks],
        "g0": g0,
        "nchunk": nchunk,
        "accs": e.accumulators(nr * nt, lanes),
    }


def _signed_operands(e, w, x, n):
    """|w| (as unsigned bytes) and x with w's sign: |w| * sign(w)x == w * x."""
    b = e.b
    vt = _vec(_i8, n)
    absf = e.fn(f"llvm.abs.v{n}i8", vt, [vt, _i1])
    aw = b.call(absf, [w, ir.Constant(_i1, 0)])  # abs(-128) = 0x80 = 128 unsigned
    if n == 32:  # vpsignb: x negated where w < 0, zeroed where w == 0
        psign = e.fn("llvm.x86.avx2.psign.b", vt, [vt, vt])
        return aw, b.call(psign, [x, w])
    neg = b.icmp_signed("<", w, ir.Constant(vt, [0] * n))  # AVX-512 has no vpsignb
    sx = b.select(neg, b.sub(ir.Constant(vt, [0] * n), x), x)
    return aw, sx


def _emit_q8_avx2(e, nr, nt):
    """Chunks of 1 group (32 int8 weights) with abs/sign + vpmaddubsw/vpmaddwd."""
    b = e.b
    o = _q8_body(e, nr, nt, 8)
    v32i8, v16i16, v8i32, v8f = (
        _vec(_i8, 32),
        _vec(_i16, 16),
        _vec(_i32, 8),
        _vec(_f32, 8),
    )
    maddubs = e.fn("llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
    maddwd = e.fn("llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
    fma = e.fn("llvm.fma.v8f32", v8f, [v8f, v8f, v8f])
    ones = ir.Constant(v16i16, [1] * 16)
    with cgutils.for_range(b, o["nchunk"]) as loop:
        g = b.add(o["g0"], loop.index)
        off = b.mul(g, e.const(32))
        xs = [
            (
                e.load(o["q"], b.add(o["xbase"][u], off), v32i8),
                e.load(o["d"], b.add(o["dbase"][u], g), _f32),
            )
            for u in range(nt)
        ]
        for k in range(nr):
            w = e.load(o["pd"], b.add(o["wbase"][k], off), v32i8)
            sw = e.halves_to_floats(o["sd"], b.add(o["sbase"][k], g), 1)
            sw = b.extract_element(sw, ir.Constant(_i32, 0))
            for u, (x, dx) in enumerate(xs):
                aw, sx = _signed_operands(e, w, x, 32)
                i = b.call(maddwd, [b.call(maddubs, [aw, sx]), ones])
                m = b.fmul(sw, dx)
                mv = e.spread(
                    b.insert_element(
                        ir.Constant(_vec(_f32, 1), None), m, ir.Constant(_i32, 0)
                    ),
                    1,
                    8,
                )
                acc = o["accs"][k * nt + u]
                b.store(b.call(fma, [b.sitofp(i, v8f), mv, b.load(acc)]), acc)
    return [e.hsum(b.load(a), 8) for a in o["accs"]]


def _emit_q8_vnni(e, nr, nt):
    """Chunks of 2 groups (64 int8 weights) with abs/sign + vpdpbusd."""
    b = e.b
    o = _q8_body(e, nr, nt, 16)
    v64i8, v16i32, v16f = _vec(_i8, 64), _vec(_i32, 16), _vec(_f32, 16)
    dpbusd = e.fn("llvm.x86.avx512.vpdpbusd.512", v16i32, [v16i32, v16i32, v16i32])
    fma = e.fn("llvm.fma.v16f32", v16f, [v16f, v16f, v16f])
    zero = ir.Constant(v16i32, [0] * 16)
    with cgutils.for_range(b, o["nchunk"]) as loop:
        g = b.add(o["g0"], b.mul(loop.index, e.const(2)))
        off = b.mul(g, e.const(32))
        xs = [
            (
                e.load(o["q"], b.add(o["xbase"][u], off), v64i8),
                e.spread(e.load(o["d"], b.add(o["dbase"][u], g), _vec(_f32, 2)), 2, 8),
            )
            for u in range(nt)
        ]
        for k in range(nr):
            w = e.load(o["pd"], b.add(o["wbase"][k], off), v64i8)
            s = e.spread(e.halves_to_floats(o["sd"], b.add(o["sbase"][k], g), 2), 2, 8)
            for u, (x, dx) in enumerate(xs):
                aw, sx = _signed_operands(e, w, x, 64)
                i = b.call(dpbusd, [zero, b.bitcast(aw, v16i32), b.bitcast(sx, v16i32)])
                acc = o["accs"][k * nt + u]
                m = b.fmul(s, dx)
                b.store(b.call(fma, [b.sitofp(i, v16f), m, b.load(acc)]), acc)
    return [e.hsum(b.load(a), 16) for a in o["accs"]]


# ----------------------------------------------------------------------------- intrinsics


def _codegen(emit, nr, nt):
    def codegen(context, builder, sig, llargs):
        e = _Emitter(context, builder, sig, llargs)
        return e.ret_tuple(emit(e, nr, nt))

    return codegen


def _q4_intrinsic(emit, nr, nt):
    def q4_block(typingctx, packed, scales, r0, lo, hi, corr, dl, t0, g0, nchunk):
        ret = types.UniTuple(types.float32, nr * nt)
        sig = ret(packed, scales, r0, lo, hi, corr, dl, t0, g0, nchunk)
        return sig, _codegen(emit, nr, nt)

    return intrinsic(q4_block)


def _q8_intrinsic(emit, nr, nt):
    def q8_block(typingctx, packed, scales, r0, q, d, t0, g0, nchunk):
        ret = types.UniTuple(types.float32, nr * nt)
        return ret(packed, scales, r0, q, d, t0, g0, nchunk), _codegen(emit, nr, nt)

    return intrinsic(q8_block)


def _make_q4(emit):
    """``@intrinsic`` q4 block functions for each (NR, NT) block shape."""
    return {s: _q4_intrinsic(emit, *s) for s in _SHAPES}


def _make_q8(emit):
    """``@intrinsic`` q8 block functions for each (NR, NT) block shape."""
    return {s: _q8_intrinsic(emit, *s) for s in _SHAPES}


_SHAPES = ((1, 1), (2, 1), (1, 4), (2, 4), (4, 1), (4, 2), (2, 2))
Q4_AVX2 = _make_q4(_emit_q4_avx2)
Q4_VNNI = _make_q4(_emit_q4_vnni)
Q4_AVX2_G8 = _make_q4(_emit_q4_avx2_g8)
Q8_AVX2 = _make_q8(_emit_q8_avx2)
Q8_VNNI = _make_q8(_emit_q8_vnni)
