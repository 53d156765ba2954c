"""The registry of preference methods: one file per method under hanorec/methods/, one object each.

    from hanorec import methods
    methods.get("dpo")            # the Method object (hanorec.methods.base.Method)
    methods.variants()            # 'HaNo-DPO w/o HaRS' -> the pref overrides that train it
    methods.register(Method(...)) # a new loss, usable from the CLI, the app, jobs and `compare`

Adding a method is one file (a Method passed to register) and its test; nothing else is edited. The rest
of the project asks the registry: which methods exist, what each needs (reference model, K rejected
completions, the chosen answer without images, HaRS hardness, NoDO noise, state carried across batches),
which knobs it reads, and how a trained configuration is named ('IPO + NoDO (beyond the paper)').

HaRS and NoDO are add-ons. NoDO (pref.noise_target / noise_sigma) perturbs the policy's forward and so
combines with every loss. HaRS's dynamic beta (pref.hars=true, with pref.hardness / pref.responsiveness
choosing its parts) combines with the losses whose beta scales a preference logit (method.hars='addon').
Either one on a method other than HaNo-DPO is beyond the paper, and its label says so.
"""

from __future__ import annotations

from hanorec.methods.base import Knob, LossBatch, LossOutput, Method, MethodError, in_range, positive

__all__ = [
    "Knob",
    "LossBatch",
    "LossOutput",
    "Method",
    "MethodError",
    "in_range",
    "positive",
    "register",
    "unregister",
    "get",
    "names",
    "all_methods",
    "variants",
    "paper_variants",
    "variant_of",
    "label_of",
    "hars_active",
    "uses_hardness",
    "nodo_active",
    "validate",
    "table",
    "format_table",
    "describe_knobs",
    "option_knobs",
    "load_plugins",
    "plugin_files",
    "activate",
    "is_registered",
]

_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add a method to the registry (its name must be new unless replace=True); returns it."""
    if not method.name.isidentifier():
        raise MethodError(f"method name {method.name!r} must be a Python identifier (letters, digits, _)")
    if method.hars not in ("builtin", "addon", "no"):
        raise MethodError(f"method {method.name}: hars = {method.hars!r} is not one of builtin, addon, no")
    if method.stateful and method.init_state is None:
        raise MethodError(f"method {method.name} is stateful and needs init_state")
    old = _REGISTRY.get(method.name)
    if old is not None and not replace and _source(old) != _source(method):  # the same file again: a reload
        raise MethodError(f"a method named {method.name!r} is already registered (from {_source(old)})")
    clash = [v for v in _variants_of(method) if v in variants() and variants()[v].get("method") != method.name]
    if clash:
        raise MethodError(f"method {method.name}: the label {clash[0]!r} already names another method's row")
    _REGISTRY[method.name] = method
    return method


def _source(method: Method) -> str:
    code = getattr(method.loss_fn, "__code__", None)
    return code.co_filename if code is not None else repr(method.loss_fn)


_PLUGINS: dict[str, object] = {}
MAX_OPTION = 1e4  # |value| of a method's own numeric option (pref.options.*): beyond it no knob means anything


def plugin_files(spec) -> list:
    """The .py files a plug-in entry names: the file itself, or every ``*.py`` file directly in a folder
    (sorted; links and hidden files skipped). MethodError for anything else."""
    from pathlib import Path

    path = Path(str(spec)).expanduser().resolve()
    if path.is_dir():
        return [f for f in sorted(path.glob("*.py")) if f.is_file() and not f.is_symlink() and not f.name.startswith(".")]
    if path.is_file() and path.suffix == ".py":
        return [path]
    raise MethodError(f"pref.plugins names {spec}, which is neither a .py file nor a folder of them")


def load_plugins(plugins) -> None:
    """Import what registers more methods: .py files, folders of them, or modules (dotted names), once each.

    Operator code only: the CLI's --plugins / pref.plugins typed by whoever runs it, or the folder the app's
    operator names with `python app/main.py --plugins DIR`. It is called by the process that trains (the CLI
    commands, a ZeroGPU job: :func:`activate`) and by the app at start; reading or listing a run's config
    never imports anything (:func:`validate` does not call it)."""
    import hashlib
    import importlib
    import importlib.util

    for spec in plugins or []:
        spec = str(spec)
        if spec in _PLUGINS:
            continue
        if spec.endswith(".py") or "/" in spec:
            for path in plugin_files(spec):
                name = "hanorec_plugin_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
                if name in _PLUGINS:
                    continue
                loader = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader)
                try:
                    loader.loader.exec_module(module)
                except MethodError:
                    raise
                except Exception as e:  # noqa: BLE001 - the operator's file: one sentence, not a traceback
                    raise MethodError(f"pref.plugins: importing {path.name} failed: {type(e).__name__}: {e}") from None
                _PLUGINS[name] = module
            _PLUGINS[spec] = None
        else:
            try:
                module = importlib.import_module(spec)
            except ImportError as e:
                raise MethodError(f"pref.plugins names the module {spec!r}, which cannot be imported: {e}") from None
            _PLUGINS[spec] = module


def activate(pref) -> dict:
    """In the process that trains: import the run's plug-ins (pref.plugins, operator code, see load_plugins),
    then check the pref section against its method; returns the options with defaults filled in."""
    load_plugins(getattr(pref, "plugins", None))
    return validate(pref)


def is_registered(name: str) -> bool:
    _load_builtins()
    return name in _REGISTRY


def unregister(name: str) -> None:
    """Remove a method (tests that register their own)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Method:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodError(
            f"method = {name!r} is not a registered preference method; use one of {names()} "
            "(python -m hanorec methods lists them)"
        ) from None


def names() -> list[str]:
    _load_builtins()
    return list(_REGISTRY)


def all_methods() -> list[Method]:
    _load_builtins()
    return list(_REGISTRY.values())


def _variants_of(m: Method) -> dict[str, dict]:
    own = {"method": m.name, **m.variant}
    out = {m.label: own}
    for suffix, over in m.ablations.items():
        out[f"{m.label} {suffix}"] = {**own, **over}
    return out


def variants() -> dict[str, dict]:
    """Every trainable row, in registry order: label -> the pref overrides that train it (a method's own
    row, then its named ablations)."""
    out: dict[str, dict] = {}
    for m in _REGISTRY.values() if _BUILTINS_LOADED else all_methods():
        out.update(_variants_of(m))
    return out


def paper_variants() -> dict[str, dict]:
    """The rows of the paper's comparison (table 3): DPO, S-DPO, HaNo-DPO and its two ablations."""
    return {k: v for k, v in variants().items() if get(v["method"]).in_paper_comparison}


def variant_of(label: str) -> dict:
    try:
        return dict(variants()[label])
    except KeyError:
        raise MethodError(f"{label!r} is not one of {list(variants())}") from None


# ---- reading a pref section --------------------------------------------------------------------------
def hars_active(pref) -> bool:
    """HaRS's dynamic beta applies: built in (HaNo-DPO) or added (pref.hars on an 'addon' method)."""
    m = get(pref.method)
    return m.hars == "builtin" or (m.hars == "addon" and bool(getattr(pref, "hars", False)))


def uses_hardness(pref) -> bool:
    """lambda_n is computed for the training pairs (HaRS with pref.hardness on)."""
    return hars_active(pref) and bool(pref.hardness)


def nodo_active(pref) -> bool:
    return pref.noise_target != "none" and pref.noise_sigma > 0


def label_of(pref: dict | object) -> str:
    """A trained configuration's name: a registered row ('HaNo-DPO w/o NoDO') when its fields match one,
    else the method's label with its add-ons, marked '(beyond the paper)' when an add-on is on a method
    that the paper does not combine it with."""
    p = pref if isinstance(pref, dict) else _as_dict(pref)
    try:
        m = get(p.get("method"))
    except MethodError:
        return str(p.get("method"))
    defaults = {"noise_target": "lora", "hardness": True, "responsiveness": True, "hars": False}
    for label, over in _variants_of(m).items():
        want = {**defaults, **over}
        if all(p.get(k, defaults.get(k)) == v for k, v in want.items() if k in defaults or k == "method"):
            return label
    hars = m.hars == "addon" and bool(p.get("hars"))
    nodo = p.get("noise_target", "lora") != "none" and float(p.get("noise_sigma", 0.05) or 0) > 0
    addons = (["HaRS"] if hars else []) + (["NoDO"] if nodo and m.hars != "builtin" else [])
    return " + ".join([m.label, *addons]) + (" (beyond the paper)" if addons else "")


def _as_dict(pref) -> dict:
    import dataclasses

    return dataclasses.asdict(pref) if dataclasses.is_dataclass(pref) else dict(vars(pref))


# ---- configuration ---------------------------------------------------------------------------------
def option_knobs(method: Method) -> list[Knob]:
    return [k for k in method.knobs if not k.field]


def _coerce(knob: Knob, value):
    if knob.type is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("true", "1", "yes", "on"):
            return True
        if s in ("false", "0", "no", "off"):
            return False
        raise ValueError
    if isinstance(value, bool):
        raise ValueError
    if knob.type is int:
        f = float(value)
        if not f.is_integer():
            raise ValueError
        return int(f)
    return knob.type(value)


def validate(pref) -> dict:
    """Check a pref section against its method; returns the method's options with defaults filled in.

    Raises MethodError with one sentence naming the key and value at fault. Imports nothing: a method from a
    plug-in is known once the process that trains has called :func:`activate` (or the app loaded its
    operator's plug-in folder)."""
    import math

    m = get(pref.method)
    given = pref.options or {}
    if not isinstance(given, dict):
        raise MethodError(f"pref.options = {given!r} must be a mapping of knob names to values")
    own = {k.name: k for k in option_knobs(m)}
    unknown = [k for k in given if k not in own]
    if unknown:
        known = ", ".join(own) or "none"
        raise MethodError(
            f"pref.options.{unknown[0]} = {given[unknown[0]]!r} is not a knob of {m.name} (its knobs: {known})"
        )
    options = {}
    for name, knob in own.items():
        raw = given.get(name, knob.default)
        try:
            value = _coerce(knob, raw)
        except (TypeError, ValueError):
            raise MethodError(f"{knob.key} = {raw!r} is not a valid {knob.type.__name__}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise MethodError(f"{knob.key} = {raw!r} must be a finite number")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_OPTION:
            raise MethodError(f"{knob.key} = {raw!r} is out of range: a method's option is at most {MAX_OPTION:g} in size")
        options[name] = value
    for knob in m.knobs:
        value = getattr(pref, knob.name) if knob.field else options[knob.name]
        why = knob.check(value) if knob.check is not None else None
        if why:
            raise MethodError(f"{knob.key} = {value!r} {why} for {m.name}")
    if pref.k_negatives != 1 and not m.k_rejected:
        rows = [x.name for x in all_methods() if x.k_rejected]
        raise MethodError(
            f"k_negatives = {pref.k_negatives} needs a method that takes K rejected completions ({', '.join(rows)}); "
            f"{m.name} uses one rejected completion"
        )
    if getattr(pref, "hars", False) and m.hars == "no":
        rows = [x.name for x in all_methods() if x.hars == "addon"]
        raise MethodError(
            f"pref.hars = true: {m.name} has no beta that HaRS could scale; HaRS combines with {', '.join(rows)}"
        )
    if hars_active(pref) and pref.responsiveness and pref.batch_size < 3:
        raise MethodError(
            f"pref.batch_size = {pref.batch_size}: HaRS's responsiveness eta ({m.label}) is a trimmed mean over the "
            "micro-batch and needs at least 3 pairs in it; raise batch_size or set pref.responsiveness=false"
        )
    return options


def describe_knobs() -> str:
    """Every method's own knobs (pref.options.*), for `config --help`."""
    lines = []
    for m in all_methods():
        for k in option_knobs(m):
            lines.append(f"    --{k.key}={k.default!r} ({m.name}): {k.help}")
    return "\n".join(lines)


# ---- the table -----------------------------------------------------------------------------------
def table() -> list[dict]:
    """One row per trainable variant: name, its method, loss in one line, what it needs, paper."""
    rows = []
    for label, over in variants().items():
        m = get(over["method"])
        extra = {k: v for k, v in over.items() if k != "method"}
        needs = m.needs()
        if over.get("noise_target", "lora") != "none":
            needs = [*needs, "NoDO noise"]
        if m.hars == "builtin" and over.get("hardness") is False:
            needs = [n for n in needs if n != "hardness lambda"]
        rows.append(
            {
                "name": label,
                "method": m.name,
                "settings": ", ".join(f"{k}={v}" for k, v in extra.items()),
                "loss": m.equation,
                "needs": ", ".join(needs) or "-",
                "paper": m.paper,
            }
        )
    return rows


def format_table(rows: list[dict] | None = None) -> str:
    rows = table() if rows is None else rows
    cols = ["name", "method", "settings", "needs", "paper"]
    out = []
    for r in rows:
        out.append(f"{r['name']}  [--pref.method={r['method']}" + (f", {r['settings']}" if r["settings"] else "") + "]")
        out.append(f"    loss:  {r['loss']}")
        out.append(f"    needs: {r['needs']}")
        out.append(f"    paper: {r['paper']}")
    return f"{len(rows)} preference methods and ablations ({', '.join(cols)}):\n" + "\n".join(out)


# ---- the built-in methods ------------------------------------------------------------------------
_BUILTINS_LOADED = False
BUILTINS = ("dpo", "sdpo", "hano_dpo", "beta_dpo", "cdpo", "rdpo", "ipo", "simpo", "dmpo", "dynamicpo", "mdpo")


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib

    for name in BUILTINS:  # registry order: the paper's methods, then the baselines
        importlib.import_module(f"hanorec.methods.{name}")
