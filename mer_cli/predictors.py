"""Expert predictors: which experts the next 1-3 layers will ask for.

Three kinds, fitted from routing traces (:mod:`mer_cli.formats.trace`) by
``mer train-predictor`` (:mod:`mer_cli.train_predictor`) and saved as one
versioned ``.npz`` (no pickle, format below):

* ``markov``: second-order Markov over expert *sets*,
  ``P(e in E[l+d] | E[l], E[l-1])``, backed off to first order
  ``P(e in E[l+d] | E[l])`` and to the per-layer frequency of ``e``, plus the
  temporal signal ``P(e in E[l+d](t) | E[l+d](t-1))`` (the same layer at the
  previous token); a logistic combination of the four (per distance ``d``)
  gives the probability.
* ``mlp``: a small multi-label MLP per layer (numpy-trained with Adam) from the
  hidden-state sketch, the current and previous layer's experts and the
  previous token's experts at the target layers to the experts of layers
  ``l+1..l+A``. With ``router_inputs`` (meta, trained with ``--model``) it
  also takes the router lookahead of the target layers -- their RMS norm and
  router applied to the hidden state, with weights copied from the store into
  the file -- so it refines the training-free baseline. With
  ``preview_inputs`` (meta; kind ``mlp+preview``, trained on traces recorded
  with the attention preview) it also takes the sketch of the attention
  preview of layer ``l+1``: layer ``l+1``'s attention run early on the
  residual entering layer ``l``'s MoE block
  (:func:`mer_cli.models.layers.attention_preview`), which sees the context
  (the earlier positions' keys and values) that decides much of ``l+1``'s
  routing, at the time layer ``l``'s experts are read.
* ``shadow`` (one layer ahead; fitted with ``--model``, :mod:`mer_cli.shadow`):
  a rank-R linear surrogate of every expert, fitted by least squares on the
  experts' real inputs and outputs over the training prompts. After layer
  ``l``'s routing, the surrogates of its selected experts stand in for its MoE
  output ``y~``, layer ``l+1``'s attention runs early on ``x + y~`` (the
  preview, as above, but of the residual layer ``l+1`` will nearly see), and
  layer ``l+1``'s router on it gives the scores. It costs two thin products
  per selected expert, an attention and a router.

Live interface (``mer generate --predictor``)::

    from mer_cli.predictors import load_predictor
    pred = load_predictor("run.pred.npz", store)   # or a ModelConfig
    pred.kind, pred.max_distance                   # "markov" | "mlp", 1..3
    pred.reset()                                   # a new sequence
    scores = pred.observe(layer, experts, hidden)  # after layer's routing
    pred.wants_preview                             # True: also pass preview=
    pred.shadow_output(layer, experts, hidden)     # shadow: the residual the
                                                   # preview is taken of
    # {target_layer: f32 [E] in [0, 1]} for target_layer in
    #   layer+1 .. min(layer+max_distance, L-1); never wraps to the next token

``observe`` is called once per layer of every step, in layer order; a layer
at or below the previous call's starts a new step (token). ``experts`` is int
``[K]`` (one token) or ``[T, K]`` (T consecutive tokens of a prefill chunk),
``hidden`` f32 ``[D]`` or ``[T, D]`` is the residual stream entering that
layer's MoE block (before its RMS norm) -- the predictor applies its own
projection; ``markov`` ignores it, ``mlp`` needs it. ``preview`` (same
shape, optional) is the attention preview of layer ``layer+1``; a predictor
that ``wants_preview`` and gets none (prefill, batched decode) puts its
training mean in those inputs. With ``[T, K]`` input each
score is ``[T, E]``; inside a chunk the previous token's experts at a later
layer are not known yet, so rows after the first get no temporal signal
(during decode, T = 1, every row has it). :meth:`Predictor.predict_trace`
scores a whole trace token by token (decode order) with the same code.

File format (``mer-predictor`` version 1, ``man/mer-predictor.5``): an
uncompressed ``.npz`` whose
``meta.json`` member (uint8, UTF-8 JSON) holds ``format``, ``version``,
``kind``, the model's ``store_id``, ``arch``, ``num_layers``, ``num_experts``,
``top_k``, ``hidden_size``, ``sketch_dim``, ``sketch_seed``,
``max_distance`` and ``created_by``, plus free-form ``training`` figures (an
``mlp`` with router inputs adds ``router_inputs: true`` and ``rms_norm_eps``,
one with preview inputs ``preview_inputs: true``);
the arrays of each kind are listed in :data:`SCHEMAS`,
:data:`ROUTER_SCHEMA` and :data:`PREVIEW_SCHEMA` (shape letters: L layers,
E experts, A max_distance, S sketch width, D model width, F MLP inputs,
H hidden units, M1/M2 context-table rows).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.errors import FormatError, UsageError
from mer_cli.formats.npz import Kind, check_header, load_npz, save_npz
from mer_cli.formats.trace import Sketcher

FORMAT = "mer-predictor"
VERSION = 1
KIND = Kind(
    fmt=FORMAT,
    noun="predictor",
    make="mer train-predictor",
    redo="train it again with mer train-predictor",
    not_this="not a mer predictor (a trace? train one with mer train-predictor "
    "TRACE -o PRED)",
)
KINDS = ("markov", "mlp", "shadow")
MAX_DISTANCE = 3

META_FIELDS: dict[str, type] = {
    "format": str,
    "version": int,
    "kind": str,
    "store_id": str,
    "arch": str,
    "num_layers": int,
    "num_experts": int,
    "top_k": int,
    "hidden_size": int,
    "sketch_dim": int,
    "sketch_seed": int,
    "max_distance": int,
    "created_by": str,
}
# model fields a predictor must share with the model it serves
MODEL_FIELDS = ("arch", "num_layers", "num_experts", "top_k", "hidden_size")

# kind -> member -> (dtype, shape in letters or meta fields)
SCHEMAS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "markov": {
        "freq": ("float32", ("L", "E")),  # P(e in E[l])
        "temporal": ("float32", ("L", "2", "E")),  # P(e in E[l](t) | not in/in t-1)
        "o1_keys": ("uint64", ("M1",)),  # sorted context keys (l, d, E[l])
        "o1_n": ("int32", ("M1",)),  # times each context was seen
        "o1_counts": ("int32", ("M1", "E")),  # times e was in E[l+d] after it
        "o2_keys": ("uint64", ("M2",)),  # (l, d, E[l], E[l-1])
        "o2_n": ("int32", ("M2",)),
        "o2_counts": ("int32", ("M2", "E")),
        "mix": ("float32", ("A", "5")),  # combiner weights of p2 p1 pt p0 1
        "beta": ("float32", ()),  # back-off strength (pseudo-counts)
    },
    "mlp": {
        "projection": ("float32", ("D", "S")),
        "mu": ("float32", ("L", "S")),  # sketch standardisation
        "sd": ("float32", ("L", "S")),
        "w1": ("float32", ("L", "F", "H")),
        "b1": ("float32", ("L", "H")),
        "w2": ("float32", ("L", "H", "AE")),
        "b2": ("float32", ("L", "AE")),
    },
    "shadow": {
        "shadow_in": ("float32", ("L", "E", "R", "D1")),  # [xn, 1] -> rank R
        "shadow_out": ("float32", ("L", "E", "D", "R")),  # rank R -> expert out
        "routers": ("float32", ("L", "E", "D")),
        "router_norms": ("float32", ("L", "D")),
    },
}
# members of an mlp with meta "router_inputs": true (router lookahead inputs)
ROUTER_SCHEMA: dict[str, tuple[str, tuple[str, ...]]] = {
    "routers": ("float32", ("L", "E", "D")),  # each layer's router [E, D]
    "router_norms": ("float32", ("L", "D")),  # and its ffn_norm weight
}

# members of an mlp with meta "preview_inputs": true (attention-preview inputs)
PREVIEW_SCHEMA: dict[str, tuple[str, tuple[str, ...]]] = {
    "preview_mu": ("float32", ("L", "S")),  # preview sketch standardisation
    "preview_sd": ("float32", ("L", "S")),
}

# random 64-bit codes of experts (XOR of a set's codes = the set's key part)
_CODES = np.random.default_rng(0x6D6572).integers(
    1, 2**63, size=4096, dtype=np.uint64, endpoint=False
) | np.uint64(1)
_C1, _C2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)
_C3 = 0x165667B19E3779F9


def set_codes(x: np.ndarray) -> np.ndarray:
    """uint64 ``[...]`` code of each expert set given as bool ``[..., E]``
    (XOR of per-expert random codes: order-free, equal sets equal codes)."""
    E = x.shape[-1]
    return np.bitwise_xor.reduce(np.where(x, _CODES[:E], np.uint64(0)), axis=-1)


def context_keys(
    layer: int, distance: int, cur: np.ndarray, prev: np.ndarray | None = None
) -> np.ndarray:
    """uint64 ``[T]`` table keys of contexts (layer, distance, E[l][, E[l-1]])
    from set codes ``cur`` (and ``prev``) ``[T]``."""
    tag = np.uint64(((layer * 8 + distance + 1) * _C3) % 2**64)
    k = cur * _C1 + tag
    if prev is not None:
        k = k + (prev ^ np.uint64(0x5BD1E995)) * _C2
    return k


def multi_hot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """bool ``[..., E]`` from int expert ids ``[..., K]``."""
    x = np.zeros(experts.shape[:-1] + (num_experts,), bool)
    np.put_along_axis(x, experts.astype(np.int64), True, axis=-1)
    return x


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class Predictor:
    """Base class: shared sequence state and the :meth:`observe` protocol.

    Attributes
    ----------
    kind : str
        ``"markov"`` or ``"mlp"``.
    max_distance : int
        A: layers ahead it predicts (1..3).
    meta : dict
        The file's meta fields (model shape, training figures).
    arrays : dict[str, np.ndarray]
        The kind's members (:data:`SCHEMAS`).
    """

    kind = ""

    def __init__(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.meta = meta
        self.arrays = arrays
        self._sketcher = None
        self.L = int(meta["num_layers"])
        self.E = int(meta["num_experts"])
        self.K = int(meta["top_k"])
        self.max_distance = int(meta["max_distance"])
        self.reset()

    def sketch(self, hidden: np.ndarray) -> np.ndarray:
        """f16 ``[T, S]`` sketch of the f32 residual ``[T, D]``, exactly as
        ``mer trace`` records it (:class:`~mer_cli.formats.trace.Sketcher`)."""
        if self._sketcher is None:
            self._sketcher = Sketcher(self.arrays["projection"])
        return self._sketcher(hidden)

    # ---------------------------------------------------------------- state

    def reset(self) -> None:
        """Forget the sequence (a new prompt starts)."""
        self._step: dict[int, np.ndarray] = {}  # layer -> bool [T, E] this step
        self._last = np.zeros((self.L, self.E), bool)  # most recent token's sets
        self._known = np.zeros(self.L, bool)
        self._layer = self.L  # so that the first call starts a step

    @property
    def wants_preview(self) -> bool:
        """Whether :meth:`observe` uses the attention preview (``preview=``)."""
        return bool(self.meta.get("preview_inputs", False))

    def _preview_input(self, preview: np.ndarray) -> np.ndarray:
        """What :meth:`_scores` takes of the preview ``[T, D]``: its sketch."""
        return self.sketch(preview)

    def preview_residual(
        self, layer: int, experts: np.ndarray, hidden: np.ndarray
    ) -> np.ndarray:
        """The residual ``[T, D]`` to take layer ``layer+1``'s attention preview
        of, given ``hidden`` entering ``layer``'s MoE block and its routing
        ``experts`` ``[T, K]``: ``hidden`` itself (``shadow`` adds its
        surrogate MoE output)."""
        return hidden

    def observe(
        self,
        layer: int,
        experts: np.ndarray,
        hidden: np.ndarray | None = None,
        preview: np.ndarray | None = None,
    ) -> dict[int, np.ndarray]:
        """Record ``layer``'s routing; predict the next layers (module docstring).

        Parameters
        ----------
        layer : int
            The layer just routed, 0..L-1.
        experts : int ``[K]`` or ``[T, K]``
            Its selected experts.
        hidden : f32 ``[D]`` or ``[T, D]``, optional
            Residual stream entering the layer's MoE block (``mlp`` needs it).
        preview : f32 ``[D]`` or ``[T, D]``, optional
            The attention preview of layer ``layer+1`` (used when
            :attr:`wants_preview`).

        Returns
        -------
        dict[int, np.ndarray]
            ``{target_layer: f32 [E]}`` (``[T, E]`` for 2-D input), targets
            ``layer+1 .. min(layer+max_distance, L-1)``.
        """
        if not 0 <= layer < self.L:
            raise ValueError(f"observe: layer {layer} not in 0..{self.L - 1}")
        ex = np.asarray(experts)
        single = ex.ndim == 1
        ex = ex.reshape(-1, ex.shape[-1])
        if ex.size and (ex.min() < 0 or ex.max() >= self.E):
            raise ValueError(f"observe: experts {ex.tolist()} not in 0..{self.E - 1}")
        if hidden is not None:
            hidden = np.asarray(hidden, np.float32).reshape(ex.shape[0], -1)
        pv = None
        if preview is not None and self.wants_preview:
            pv = np.asarray(preview, np.float32).reshape(ex.shape[0], -1)
            pv = self._preview_input(pv)
        if layer <= self._layer:
            self._step.clear()
        self._layer = layer
        x = multi_hot(ex, self.E)  # [T, E]
        T = x.shape[0]
        below = self._step.get(layer - 1)
        if below is not None and below.shape[0] != T:
            below = None
        A = min(self.max_distance, self.L - 1 - layer)
        # previous token at the target layers: known for the first row only
        prev = np.zeros((T, self.max_distance, self.E), bool)
        has_prev = np.zeros((T, self.max_distance), bool)
        for d in range(1, A + 1):
            if self._known[layer + d]:
                prev[0, d - 1] = self._last[layer + d]
                has_prev[0, d - 1] = True
        scores = None
        if A:
            kw = {"preview": pv} if self.wants_preview else {}
            scores = self._scores(layer, x, below, prev, has_prev, hidden, **kw)
        self._step[layer] = x
        self._last[layer] = x[-1]
        self._known[layer] = True
        out = {}
        for d in range(1, A + 1):
            s = scores[:, d - 1].astype(np.float32)
            out[layer + d] = s[0] if single else s
        return out

    def _scores(
        self,
        layer: int,
        x: np.ndarray,
        below: np.ndarray | None,
        prev: np.ndarray,
        has_prev: np.ndarray,
        hidden: np.ndarray | None,
        sketch: np.ndarray | None = None,
    ) -> np.ndarray:
        """f32 ``[T, A, E]`` probabilities for ``layer+1..layer+A`` (rows past
        the last layer are undefined). ``x`` bool ``[T, E]`` experts at
        ``layer``, ``below`` the same at ``layer-1`` (None: unknown), ``prev``
        bool ``[T, A, E]`` the previous token at the targets where
        ``has_prev`` ``[T, A]``; ``sketch`` f32 ``[T, S]`` (and, for router-input
        MLPs, ``lookahead`` ``[T, A, E]``) replace ``hidden``; preview-input
        MLPs take ``preview`` f16 ``[T, S]``, the preview's sketch (None: the
        training mean)."""
        raise NotImplementedError

    def predict_trace(self, trace) -> np.ndarray:
        """f32 ``[N, L, A, E]`` scores for every token of ``trace``, as
        :meth:`observe` gives them token by token (decode order); entries with
        ``l + d >= L`` are 0."""
        X = multi_hot(trace.experts, self.E)  # [N, L, E]
        N, L, A, E = X.shape[0], self.L, self.max_distance, self.E
        first = trace.positions == 0
        has_prev = np.zeros((N, A), bool)
        has_prev[1:] = (~first[1:] & (trace.prompt[1:] == trace.prompt[:-1]))[:, None]
        out = np.zeros((N, L, A, E), np.float32)
        for layer in range(L - 1):
            n = min(A, L - 1 - layer)
            prev = np.zeros((N, A, E), bool)
            for d in range(1, n + 1):
                prev[1:, d - 1] = X[:-1, layer + d]
            known = has_prev.copy()
            known[:, n:] = False  # no target layer that far: as observe does
            below = X[:, layer - 1] if layer else None
            sk = trace.sketch[:, layer].astype(np.float32)
            kw = {}
            if getattr(self, "router_inputs", False):
                kw["lookahead"] = trace_lookahead(trace, layer, A)
            if self.wants_preview:
                kw["preview"] = trace_preview(trace)[:, layer]
            s = self._scores(layer, X[:, layer], below, prev, known, None, sk, **kw)
            out[:, layer, :n] = s[:, :n]
        return out

    # ---------------------------------------------------------------- files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the predictor to ``path`` atomically (temp name + rename)."""
        path = Path(path)
        _check_arrays(self.kind, self.meta, self.arrays, str(path))
        save_npz(path, self.meta, self.arrays)
        return path


class MarkovPredictor(Predictor):
    """Second-order Markov over expert sets with back-off and a temporal term."""

    kind = "markov"

    def _lookup(self, order: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Counts ``[T, E]`` and totals ``[T]`` of contexts ``keys`` (0 if unseen)."""
        tk = self.arrays[f"o{order}_keys"]
        i = np.searchsorted(tk, keys)
        i = np.minimum(i, len(tk) - 1)
        hit = (tk[i] == keys) if len(tk) else np.zeros(keys.shape, bool)
        n = np.where(hit, self.arrays[f"o{order}_n"][i] if len(tk) else 0, 0)
        c = np.zeros((keys.shape[0], self.E), np.float64)
        if len(tk):
            c[hit] = self.arrays[f"o{order}_counts"][i[hit]]
        return c, n.astype(np.float64)

    def features(
        self,
        layer: int,
        distance: int,
        x: np.ndarray,
        below: np.ndarray | None,
        prev: np.ndarray,
        has_prev: np.ndarray,
        exclude: np.ndarray | None = None,
    ) -> np.ndarray:
        """f64 ``[T, E, 5]`` combiner inputs (logits of p2, p1, p_temporal,
        p_freq, and 1) for target ``layer + distance``.

        ``prev`` bool ``[T, E]`` / ``has_prev`` ``[T]``: the previous token at
        the target layer. ``exclude`` bool ``[T, E]`` (training only): the
        row's own target, taken out of the counts (leave-one-out), so that the
        combiner is fitted on counts that have not seen the row.
        """
        a, beta = self.arrays, float(self.arrays["beta"])
        t = layer + distance
        p0 = np.broadcast_to(a["freq"][t].astype(np.float64), x.shape)
        cur = set_codes(x)
        c1, n1 = self._lookup(1, context_keys(layer, distance, cur))
        if exclude is not None:
            c1, n1 = c1 - exclude, n1 - 1
        p1 = (c1 + beta * p0) / (n1 + beta)[:, None]
        if below is not None:
            k2 = context_keys(layer, distance, cur, set_codes(below))
            c2, n2 = self._lookup(2, k2)
            if exclude is not None:
                c2, n2 = c2 - exclude, n2 - 1
            p2 = (c2 + beta * p1) / (n2 + beta)[:, None]
        else:
            p2 = p1
        temp = a["temporal"][t].astype(np.float64)  # [2, E]
        pt = np.where(prev, temp[1], temp[0])
        pt = np.where(has_prev[:, None], pt, p0)
        f = np.stack([_logit(p2), _logit(p1), _logit(pt), _logit(p0)], -1)
        return np.concatenate([f, np.ones(f.shape[:-1] + (1,))], -1)

    def _scores(self, layer, x, below, prev, has_prev, hidden, sketch=None):
        T, A = x.shape[0], self.max_distance
        out = np.zeros((T, A, self.E), np.float32)
        for d in range(1, min(A, self.L - 1 - layer) + 1):
            f = self.features(layer, d, x, below, prev[:, d - 1], has_prev[:, d - 1])
            out[:, d - 1] = _sigmoid(f @ self.arrays["mix"][d - 1].astype(np.float64))
        return out


class MLPPredictor(Predictor):
    """Per-layer MLP: sketch + experts -> experts of the next A layers."""

    kind = "mlp"

    def inputs(
        self,
        layer: int,
        sketch: np.ndarray,
        x: np.ndarray,
        below: np.ndarray | None,
        prev: np.ndarray,
        has_prev: np.ndarray,
        lookahead: np.ndarray | None = None,
        preview: np.ndarray | None = None,
    ) -> np.ndarray:
        """f32 ``[T, F]`` MLP input, F = S + 2E + A*E + A (+ A*E with router
        inputs, + S with preview inputs): standardised sketch ``[T, S]``,
        experts at ``layer`` and ``layer-1``, the previous token's experts at
        the A targets and whether it is known (and the router lookahead
        ``[T, A, E]``; and the standardised preview sketch ``[T, S]``, zeros
        when ``preview`` is None)."""
        a = self.arrays
        pv = None
        if self.wants_preview:
            pv = np.zeros_like(sketch)
            if preview is not None:
                pv = np.asarray(preview, np.float32) - a["preview_mu"][layer]
                pv = pv / a["preview_sd"][layer]
        return mlp_inputs(
            (sketch - a["mu"][layer]) / a["sd"][layer],
            x,
            below,
            prev,
            has_prev,
            lookahead,
            pv,
        )

    @property
    def router_inputs(self) -> bool:
        """Whether the MLP also takes the router lookahead as input."""
        return bool(self.meta.get("router_inputs", False))

    def _scores(
        self,
        layer,
        x,
        below,
        prev,
        has_prev,
        hidden,
        sketch=None,
        lookahead=None,
        preview=None,
    ):
        if sketch is None or (self.router_inputs and lookahead is None):
            if hidden is None:
                raise ValueError(
                    "observe: the mlp predictor needs hidden (the residual entering "
                    "the MoE block)"
                )
        if sketch is None:
            sketch = self.sketch(hidden)  # as the trace stored it
        if self.router_inputs and lookahead is None:
            eps = float(self.meta["rms_norm_eps"])
            lookahead = router_lookahead(
                self.arrays, layer, hidden, self.max_distance, eps
            )
        sketch = np.asarray(sketch, np.float32)
        z = self.inputs(layer, sketch, x, below, prev, has_prev, lookahead, preview)
        logits = mlp_forward(self.arrays, layer, z)[0]  # [T, A*E]
        return _sigmoid(logits).reshape(x.shape[0], self.max_distance, self.E)


class ShadowPredictor(Predictor):
    """Layer ``l+1``'s router on the attention preview of ``x + y~``, where
    ``y~`` is layer ``l``'s MoE output computed with rank-R surrogates of its
    selected experts (module docstring; fitted by :mod:`mer_cli.shadow`)."""

    kind = "shadow"

    @property
    def wants_preview(self) -> bool:
        return True

    def _preview_input(self, preview: np.ndarray) -> np.ndarray:
        return preview  # the router takes the whole vector

    def preview_residual(self, layer, experts, hidden):
        return hidden + self.shadow_output(layer, experts, hidden)

    def normed(self, hidden: np.ndarray, layer: int) -> np.ndarray:
        """f32 ``[T, D]``: ``hidden`` after layer ``layer``'s ffn RMS norm."""
        eps = np.float32(self.meta["rms_norm_eps"])
        ms = np.mean(hidden * hidden, axis=-1, keepdims=True)
        return hidden / np.sqrt(ms + eps) * self.arrays["router_norms"][layer]

    def shadow_output(
        self, layer: int, experts: np.ndarray, hidden: np.ndarray
    ) -> np.ndarray:
        """f32 ``[T, D]``: layer ``layer``'s MoE output as the surrogates give
        it, for the residual ``hidden`` ``[T, D]`` (or ``[D]``) entering the
        MoE block whose routing selected ``experts`` ``[T, K]`` (or ``[K]``):
        each selected expert's surrogate on the normed input, mixed by the
        router's softmax over the selected experts (the weights of top-k
        softmax routing with renormalisation)."""
        a = self.arrays
        x = np.asarray(hidden, np.float32).reshape(-1, a["routers"].shape[2])
        ex = np.asarray(experts, np.int64).reshape(x.shape[0], -1)
        xn = self.normed(x, layer)
        z = np.take_along_axis(xn @ a["routers"][layer].T, ex, axis=-1)  # [T, K]
        w = np.exp(z - z.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        xb = np.concatenate([xn, np.ones((x.shape[0], 1), np.float32)], axis=1)
        y = np.zeros_like(x)
        for e in np.unique(ex):
            rows, slot = np.nonzero(ex == e)
            h = xb[rows] @ a["shadow_in"][layer, e].T  # [n, R]
            y[rows] += w[rows, slot, None] * (h @ a["shadow_out"][layer, e].T)
        return y

    def _scores(
        self, layer, x, below, prev, has_prev, hidden, sketch=None, preview=None
    ):
        v = preview if preview is not None else hidden  # no preview: lookahead
        if v is None:
            raise ValueError(
                "observe: the shadow predictor needs preview (or at least hidden)"
            )
        v = np.asarray(v, np.float32).reshape(x.shape[0], -1)
        return self.router_probs(layer + 1, v)[:, None, :]

    def router_probs(self, layer: int, v: np.ndarray) -> np.ndarray:
        """f32 ``[T, E]``: layer ``layer``'s router softmax on ``v`` ``[T, D]``
        (the residual entering its MoE block, before the norm)."""
        z = self.normed(v, layer) @ self.arrays["routers"][layer].T
        z = np.exp(z - z.max(-1, keepdims=True))
        return (z / z.sum(-1, keepdims=True)).astype(np.float32)

    def predict_trace(self, trace) -> np.ndarray:
        raise UsageError(
            "a shadow predictor's scores need the model's hidden states, which "
            "traces do not hold: score it with mer_cli.shadow.shadow_scores "
            "(mer train-predictor --model STORE does)"
        )


def mlp_inputs(
    sketch: np.ndarray,
    x: np.ndarray,
    below: np.ndarray | None,
    prev: np.ndarray,
    has_prev: np.ndarray,
    lookahead: np.ndarray | None = None,
    preview: np.ndarray | None = None,
) -> np.ndarray:
    """f32 ``[T, F]``: ``sketch`` ``[T, S]`` (standardised), ``x`` ``[T, E]``,
    ``below`` ``[T, E]`` (zeros when None), ``prev`` ``[T, A, E]`` masked by
    ``has_prev`` ``[T, A]``, ``has_prev`` itself, then (router-input MLPs)
    the router lookahead ``[T, A, E]`` (zeros past the last layer), then
    (preview-input MLPs) the standardised preview sketch ``[T, S]``."""
    T = x.shape[0]
    b = np.zeros_like(x) if below is None else below
    p = prev & has_prev[:, :, None]
    parts = [sketch, x, b, p.reshape(T, -1), has_prev]
    if lookahead is not None:
        parts.append(lookahead.reshape(T, -1))
    if preview is not None:
        parts.append(preview)
    return np.concatenate(parts, axis=1, dtype=np.float32)


def router_lookahead(
    arrays: dict[str, np.ndarray],
    layer: int,
    hidden: np.ndarray,
    max_distance: int,
    eps: float,
) -> np.ndarray:
    """f32 ``[T, A, E]``: softmax of layer ``layer+d``'s router on
    ``rms_norm(hidden, router_norms[layer+d])`` for d = 1..A, rounded to f16
    as traces store it (zeros past the last layer); ``hidden`` f32 ``[T, D]``."""
    R, W = arrays["routers"], arrays["router_norms"]
    L, E = R.shape[0], R.shape[1]
    out = np.zeros((hidden.shape[0], max_distance, E), np.float32)
    ms = np.mean(hidden * hidden, axis=-1, keepdims=True)
    xn = hidden / np.sqrt(ms + np.float32(eps))
    for d in range(1, min(max_distance, L - 1 - layer) + 1):
        z = (xn * W[layer + d]) @ R[layer + d].T  # [T, E]
        z = np.exp(z - z.max(-1, keepdims=True))
        out[:, d - 1] = (z / z.sum(-1, keepdims=True)).astype(np.float16)
    return out


def mlp_forward(
    w: dict[str, np.ndarray], layer: int, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Logits f32 ``[T, A*E]`` of layer ``layer``'s MLP on inputs ``z``
    ``[T, F]``, and its hidden activations ``[T, H]`` (ReLU)."""
    h = np.maximum(z @ w["w1"][layer] + w["b1"][layer], 0.0)
    return h @ w["w2"][layer] + w["b2"][layer], h


def trace_lookahead(trace, layer: int, max_distance: int) -> np.ndarray:
    """f32 ``[N, A, E]``: the router lookahead a trace recorded at ``layer``
    (:class:`UsageError` if it recorded fewer than A distances)."""
    from mer_cli.formats.trace import lookahead_depth

    depth = lookahead_depth(trace.meta)
    if depth < max_distance:
        raise UsageError(
            f"{trace.path or 'trace'}: records router lookahead for {depth} "
            f"layer(s) ahead; this predictor takes {max_distance}: record the "
            f"trace with mer trace --lookahead {max_distance}"
        )
    return trace.lookahead[:, layer, :max_distance].astype(np.float32)


def trace_preview(trace) -> np.ndarray:
    """f16 ``[N, L, S]``: the sketch of the attention preview a trace recorded
    (:class:`UsageError` if it recorded none)."""
    from mer_cli.formats.trace import has_preview

    if not has_preview(trace.meta):
        raise UsageError(
            f"{trace.path or 'trace'}: records no attention preview, which this "
            "predictor takes: record the trace again with mer trace (--preview "
            "is the default)"
        )
    return trace.preview_sketch


PREDICTOR_CLASSES: dict[str, type[Predictor]] = {
    "markov": MarkovPredictor,
    "mlp": MLPPredictor,
    "shadow": ShadowPredictor,
}


# ===================================================================== loading


def load_predictor(path: str | os.PathLike, model: Any = None) -> Predictor:
    """Read and validate a predictor file.

    Parameters
    ----------
    path : the ``.npz`` written by ``mer train-predictor``.
    model : ModelConfig, Store or a store's path, optional
        The model it will serve: its shape must match (a store's store_id
        too); a :class:`FormatError` names the field otherwise.

    Raises
    ------
    UsageError
        The file does not exist.
    FormatError
        Not a predictor file, corrupt or truncated, another version, a
        member of the wrong dtype or shape, or made for another model.
    """
    path = Path(path)

    def members(meta: dict, names: set[str]) -> list[str]:
        schema = schema_of(meta["kind"], meta)
        missing = [n for n in schema if n not in names]
        if missing:
            raise FormatError(
                f"{path}: member {missing[0]} is missing for a {meta['kind']} "
                "predictor; the file is incomplete: train it again"
            )
        return list(schema)

    meta, arrays = load_npz(path, KIND, _check_meta, members)
    _check_arrays(meta["kind"], meta, arrays, str(path))
    if model is not None:
        check_model(meta, model, str(path))
    return PREDICTOR_CLASSES[meta["kind"]](meta, arrays)


def schema_of(kind: str, meta: dict[str, Any]) -> dict[str, tuple[str, tuple]]:
    """The members a predictor of ``kind`` with ``meta`` must hold."""
    schema = dict(SCHEMAS[kind])
    if kind == "mlp" and meta.get("router_inputs"):
        schema |= ROUTER_SCHEMA
    if kind == "mlp" and meta.get("preview_inputs"):
        schema |= PREVIEW_SCHEMA
    return schema


def check_model(meta: dict[str, Any], model: Any, where: str) -> None:
    """:class:`FormatError` unless ``model`` (ModelConfig, Store or path) is the one
    the predictor (or trace) ``meta`` was made for."""
    if isinstance(model, (str, os.PathLike)):
        from mer_cli.formats.store import Store

        model = Store.open(model)
    cfg = getattr(model, "model", model)
    have = {
        "arch": cfg.arch,
        "num_layers": cfg.num_layers,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "hidden_size": cfg.hidden_size,
    }
    for f in MODEL_FIELDS:
        if meta[f] != have[f]:
            raise FormatError(
                f"{where}: made for a model with {f} {meta[f]!r}, but this model "
                f"has {f} {have[f]!r}; train a predictor on traces of this model "
                "(mer trace, then mer train-predictor)"
            )
    sid = getattr(model, "store_id", None)
    if sid is not None and meta["store_id"] != sid.hex():
        raise FormatError(
            f"{where}: made from traces of store {meta['store_id']}, but this "
            f"store is {sid.hex()}; train a predictor on traces of this store "
            "(mer trace, then mer train-predictor)"
        )


def _check_meta(meta: Any, where: str) -> None:
    check_header(meta, where, KIND, VERSION, META_FIELDS)
    if meta["kind"] not in KINDS:
        raise FormatError(
            f"{where}: kind is {meta['kind']!r}, expected one of {', '.join(KINDS)}"
        )
    ri = meta.get("router_inputs", False)
    if not isinstance(ri, bool):
        raise FormatError(f"{where}: router_inputs is {ri!r}, expected true or false")
    pi = meta.get("preview_inputs", False)
    if not isinstance(pi, bool) or (pi and meta["kind"] != "mlp"):
        raise FormatError(
            f"{where}: preview_inputs is {pi!r} for a {meta['kind']} predictor, "
            "expected false (or true for an mlp)"
        )
    eps = meta.get("rms_norm_eps")
    if (ri or meta["kind"] == "shadow") and (
        not isinstance(eps, float) or not 0 < eps < 1
    ):
        raise FormatError(
            f"{where}: rms_norm_eps is {eps!r}, expected a small positive number "
            "(needed with router_inputs and by shadow predictors)"
        )
    if meta["kind"] == "shadow" and meta["max_distance"] != 1:
        raise FormatError(
            f"{where}: max_distance is {meta['max_distance']} for a shadow "
            "predictor, which predicts one layer ahead: expected 1"
        )
    if not 1 <= meta["max_distance"] <= MAX_DISTANCE:
        raise FormatError(
            f"{where}: max_distance is {meta['max_distance']}, expected "
            f"1..{MAX_DISTANCE}"
        )
    for name in ("num_layers", "num_experts", "top_k", "hidden_size", "sketch_dim"):
        if meta[name] < 1:
            raise FormatError(f"{where}: {name} is {meta[name]}, expected >= 1")


def _check_arrays(
    kind: str, meta: dict[str, Any], arrays: dict[str, np.ndarray], where: str
) -> None:
    """Dtypes and shapes of ``arrays`` against :data:`SCHEMAS` and ``meta``."""
    L, E, A = meta["num_layers"], meta["num_experts"], meta["max_distance"]
    dims: dict[str, int] = {"L": L, "E": E, "A": A, "AE": A * E, "2": 2, "5": 5}
    dims |= {"D": meta["hidden_size"], "S": meta["sketch_dim"]}
    dims["D1"] = meta["hidden_size"] + 1
    # free sizes: taken from the first member that has them
    for name, (dtype, shape) in schema_of(kind, meta).items():
        a = arrays[name]
        for letter, n in zip(shape, a.shape):
            dims.setdefault(letter, n)
        want = tuple(dims.get(s, -1) for s in shape)
        if a.dtype != np.dtype(dtype) or a.shape != want:
            raise FormatError(
                f"{where}: {name} is {a.dtype}{list(a.shape)}, expected "
                f"{dtype}{list(want)} (" + ", ".join(shape) + "); the predictor "
                "does not match its meta.json: train it again"
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise FormatError(
                f"{where}: {name} holds NaN or infinity; train the predictor again"
            )
    if kind == "mlp":
        extra = A * E if meta.get("router_inputs") else 0
        pv = dims["S"] if meta.get("preview_inputs") else 0
        F = dims["S"] + 2 * E + A * E + A + extra + pv
        if dims["F"] != F:
            raise FormatError(
                f"{where}: w1 has {dims['F']} inputs, expected S + 2E + A*E + A"
                f"{' + A*E' if extra else ''}{' + S' if pv else ''} = {F}; train "
                "the predictor again"
            )
    if kind == "markov":
        for o in (1, 2):
            k = arrays[f"o{o}_keys"]
            if k.size > 1 and not (k[1:] > k[:-1]).all():
                raise FormatError(
                    f"{where}: o{o}_keys is not strictly increasing; train the "
                    "predictor again"
                )
