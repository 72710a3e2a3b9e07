"""Implementations under test: what each declares it supports, and one way to call any of them.

Modelled on PyTorch's OpInfo and scikit-learn's estimator tags: an implementation is a
small adapter with :class:`Capabilities`; properties are generated only for what it
declares, and everything else is skipped with a visible reason. Any callable with torch
SDPA's signature needs no adapter (:class:`SdpaCallable`, capabilities probed on tiny
inputs); richer kernels subclass :class:`Implementation`.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field, replace

import torch

from . import BUILTIN_IMPLEMENTATIONS
from .case import Case, Inputs
from .evaluate import Outputs

ALL_DTYPES = ("float16", "bfloat16", "float32")


class ImplementationError(Exception):
    """The implementation misbehaved in a way the report should name (not a wrong number)."""


class ImplementationNotFound(ValueError):
    """An implementation spec that names nothing loadable (the caller names its own option)."""


class ImplementationHung(ImplementationError):
    """A call outlived CALL_TIMEOUT."""


class Unsupported(Exception):
    """Raised by an adapter for a case its kernel declines under the kernel's own documented rules
    (torch SDPA's "no available kernel" for a pinned backend, say) - rules too fine-grained for
    Capabilities. The case is skipped and counted in the run summary, not failed. Raise it only
    for refusals the kernel itself signals: a crash is not a refusal."""


# Seconds one call of an implementation may take before it is reported as hung (None: no limit).
# The plugin sets it from --attn-timeout. A hung call's thread cannot be killed: it is left
# running in the background and the run goes on.
CALL_TIMEOUT: float | None = None


def _call(fn, what: str):
    """fn() with the CALL_TIMEOUT, its exceptions re-raised as they are."""
    if CALL_TIMEOUT is None:
        return fn()
    result, error = [], []

    def target():
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            error.append(e)

    worker = threading.Thread(target=target, daemon=True, name=f"flashverify-{what}")
    worker.start()
    worker.join(CALL_TIMEOUT)
    if worker.is_alive():
        raise ImplementationHung(f"{what} hung: no result within {CALL_TIMEOUT:g} s (--attn-timeout)")
    if error:
        raise error[0]
    return result[0]


@dataclass(frozen=True)
class Capabilities:
    """What an implementation supports; a case outside this is skipped, not failed."""
    dtypes: tuple = ALL_DTYPES
    causal_alignments: tuple = ("top_left", "bottom_right")   # () = no causal masking
    window: bool = True
    key_lengths: bool = True
    masks: tuple = ("bool", "additive")
    gqa: bool = True
    dropout: bool = True
    keep_mask: bool = True       # can say which dropout mask it used (needed to hold dropout to the oracle)
    deterministic_dropout: bool = True   # same seed -> same mask
    lse: bool = True
    backward: bool = True
    head_dims: tuple = (1, 256)  # inclusive range
    max_seqlen: int = 1 << 20
    strided_inputs: bool = True
    notes: dict = field(default_factory=dict)   # feature -> why unsupported (from probing)


class Implementation:
    """Adapter base: override :meth:`forward` (and :meth:`keep_mask` if dropout is observable)."""
    name = "implementation"
    capabilities = Capabilities()
    # property name -> reason: known limitations, reported as XFAIL (strict under derandomized profiles)
    expected_failures: dict = {}

    def forward(self, case: Case, inputs: Inputs, q, k, v):
        """Return O, or (O, LSE) when capabilities.lse. q/k/v may require grad."""
        raise NotImplementedError

    def keep_mask(self, case: Case, device) -> torch.Tensor | None:
        """The (B, Hq, Nq, Nk) bool keep-mask used for case.dropout_p > 0, if observable."""
        return None

    def prepare(self, case: Case, inputs: Inputs) -> None:
        """Work a user does once per problem, not per call (block masks, compilation): memory
        measurements call it first, so it stays out of the measured peak."""

    def run(self, case: Case, inputs: Inputs, backward: bool = True) -> Outputs:
        """Call the implementation once (forward, then backward with inputs.do); check what came back."""
        if getattr(self, "hung", None):  # a hung kernel may have wedged the device: do not call again
            raise ImplementationError(f"{self.hung}; not called again")
        q, k, v = (t.detach().clone().requires_grad_(backward) for t in (inputs.q, inputs.k, inputs.v))
        try:
            result = _call(lambda: self.forward(case, inputs, q, k, v), f"{self.name} forward")
        except ImplementationHung as e:
            self.hung = str(e)
            raise
        except Unsupported:
            raise
        except Exception as e:  # reported as exactly that, the run goes on
            raise ImplementationError(f"{self.name} raised {type(e).__name__}: {e}") from e
        o, lse = result if isinstance(result, tuple) else (result, None)
        _check_output("output", o, inputs.q.shape, inputs.q.dtype, inputs.q.device)
        if lse is not None:
            _check_output("lse", lse, inputs.q.shape[:3], None, inputs.q.device)
        if not backward:
            return Outputs(o=o.detach(), lse=None if lse is None else lse.detach())
        try:
            _call(lambda: o.backward(inputs.do), f"{self.name} backward")
        except ImplementationHung as e:
            self.hung = str(e)
            raise
        except Unsupported:
            raise
        except Exception as e:
            raise ImplementationError(f"{self.name} backward raised {type(e).__name__}: {e}") from e
        for name, t, ref in (("dq", q, inputs.q), ("dk", k, inputs.k), ("dv", v, inputs.v)):
            if t.grad is None:
                raise ImplementationError(f"{self.name} backward gave no gradient for {name[1]}")
            _check_output(name, t.grad, ref.shape, ref.dtype, ref.device)
        return Outputs(o=o.detach(), lse=None if lse is None else lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def _check_output(name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise ImplementationError(f"{name} is a {type(t).__name__}, not a torch.Tensor")
    if tuple(t.shape) != tuple(shape):
        raise ImplementationError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ImplementationError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ImplementationError(f"{name} is on {t.device}, expected {device}")


class Bundled(Implementation):
    """flashverify's own Triton kernel: every feature, LSE and the dropout mask observable."""
    name = "flashverify"
    capabilities = Capabilities()

    def __init__(self, **kernel_options):
        self.kernel_options = kernel_options  # e.g. blocks=(16, 16), allow_tf32=True

    def forward(self, case, inputs, q, k, v):
        from flashverify.kernels import attention
        return attention(q, k, v, causal=case.causal, causal_alignment=case.causal_alignment, window=case.window,
                         key_lengths=inputs.key_lengths, attn_mask=inputs.attn_mask, scale=case.scale,
                         dropout_p=case.dropout_p, seed=case.seed, return_lse=True, **self.kernel_options)

    def keep_mask(self, case, device):
        if case.dropout_p == 0:
            return None
        from flashverify.kernels import dropout_mask
        return dropout_mask(case.seed, (case.batch, case.heads_q, case.seqlen_q, case.seqlen_k), case.dropout_p,
                            device=device)


def sdpa_mask(case: Case, inputs: Inputs):
    """Everything the case masks, as SDPA arguments: (attn_mask, is_causal).

    Top-left causal alone maps to is_causal; anything else is materialized into one boolean
    (or, with an additive bias, one float) mask, so an SDPA-signature kernel is held to
    every masking rule the case uses.
    """
    only_causal = (case.causal and case.causal_alignment == "top_left" and case.window is None
                   and case.key_lengths is None and case.mask is None)
    if only_causal:
        return None, True
    if not (case.causal or case.window or case.key_lengths or case.mask):
        return None, False
    allowed, bias = case.masking(inputs).allowed_and_bias(case.batch, case.heads_q, case.seqlen_q, case.seqlen_k,
                                             inputs.q.device)
    if bias is None:
        return allowed, False
    return bias.to(inputs.q.dtype).masked_fill(~allowed, float("-inf")), False


class SdpaCallable(Implementation):
    """Any fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)."""

    def __init__(self, fn, name: str, capabilities: Capabilities | None = None):
        self.fn = fn
        self.name = name
        self.capabilities = capabilities or Capabilities(keep_mask=False, lse=False, deterministic_dropout=False)

    def forward(self, case, inputs, q, k, v):
        attn_mask, is_causal = sdpa_mask(case, inputs)
        kwargs = {}
        if case.heads_q != case.heads_kv:
            kwargs["enable_gqa"] = True
        if case.scale is not None:
            kwargs["scale"] = case.scale
        if case.dropout_p > 0:
            torch.manual_seed(case.seed)
            kwargs["dropout_p"] = case.dropout_p
        return self.fn(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    def probe(self, device) -> "SdpaCallable":
        """Find what the callable supports by calling it on tiny inputs; a feature whose probe
        raises (NotImplementedError, RuntimeError, TypeError, ...) is marked unsupported."""
        caps, notes = self.capabilities, {}
        probes = {
            "dtypes": [(d, Case(dtype=d, seqlen_q=4, seqlen_k=4, head_dim=16)) for d in ALL_DTYPES],
            "gqa": Case(heads_q=2, heads_kv=1, seqlen_q=4, seqlen_k=4, head_dim=16),
            "bool": Case(mask="bool", seqlen_q=4, seqlen_k=4, head_dim=16),
            "additive": Case(mask="additive", seqlen_q=4, seqlen_k=4, head_dim=16),
            "dropout": Case(dropout_p=0.5, seqlen_q=4, seqlen_k=4, head_dim=16),
        }

        def works(case, backward=False):
            try:
                self.run(case, case.inputs(device), backward=backward)
                return None
            except (ImplementationError, Unsupported) as e:
                return str(e)

        dtypes = []
        for d, c in probes["dtypes"]:
            why = works(c)
            if why:
                notes[d] = why
            else:
                dtypes.append(d)
        caps = replace(caps, dtypes=tuple(dtypes))
        for feature in ("gqa", "dropout"):
            why = works(probes[feature])
            if why:
                notes[feature] = why
                caps = replace(caps, **{feature: False})
        masks = []
        for m in ("bool", "additive"):
            why = works(probes[m])
            if why:
                notes[m] = why
            else:
                masks.append(m)
        caps = replace(caps, masks=tuple(masks))
        if not (masks and "bool" in masks):  # other mask kinds are materialized as bool masks
            caps = replace(caps, window=False, key_lengths=False, causal_alignments=("top_left",))
        why = works(Case(seqlen_q=4, seqlen_k=4, head_dim=16, dtype=caps.dtypes[0] if caps.dtypes else "float32"),
                    backward=True)
        if why:
            notes["backward"] = why
            caps = replace(caps, backward=False)
        self.capabilities = replace(caps, notes=notes)
        return self


class Naive(Implementation):
    """The naive attention in the input precision (flashverify.naive); dropout mask = the bundled kernel's."""
    name = "naive"
    capabilities = Capabilities(lse=False)

    def forward(self, case, inputs, q, k, v):
        from .naive import naive_attention
        return naive_attention(q, k, v, case.masking(inputs), case.softmax_scale, self.keep_mask(case, q.device),
                               case.dropout_p)

    def keep_mask(self, case, device):
        return BUNDLED.keep_mask(case, device)


BUNDLED = Bundled()


def builtin(name: str, device) -> Implementation:
    """A built-in implementation by name (flashverify.BUILTIN_IMPLEMENTATIONS)."""
    if name == "flashverify":
        return Bundled()
    if name == "naive":
        return Naive()
    from . import adapters
    if name in adapters.SDPA_BACKENDS:
        return adapters.sdpa_backend(name, device)
    if name == "flex":
        return adapters.FlexAttention(device)
    raise ImplementationNotFound(f"no built-in implementation {name!r}; built-ins: "
                                 f"{', '.join(BUILTIN_IMPLEMENTATIONS)}")


def load(spec: str, device=None) -> Implementation:
    """A built-in name, an Implementation class or instance at 'module:attr', or any
    SDPA-signature callable at 'module:attr' (probed for capabilities on `device`); its `spec`
    is set to `spec`, the name reports and reproducers give it."""
    impl = _load(spec, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    impl.spec = spec
    return impl


def _load(spec: str, device) -> Implementation:
    if spec in BUILTIN_IMPLEMENTATIONS:
        return builtin(spec, device)
    if ":" not in spec:
        raise ImplementationNotFound(f"an implementation is 'package.module:callable' or a built-in name "
                                     f"({', '.join(BUILTIN_IMPLEMENTATIONS)}), got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ImplementationNotFound(f"cannot load attention implementation {spec!r}: {e}") from e
    if isinstance(obj, type) and issubclass(obj, Implementation):
        obj = obj()
    if isinstance(obj, Implementation):
        return obj
    if not callable(obj):
        raise ImplementationNotFound(f"{spec!r} is neither callable nor an Implementation")
    return SdpaCallable(obj, name=spec).probe(device)
