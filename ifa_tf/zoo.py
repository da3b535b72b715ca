"""The model zoo: every model of the IFA paper, plus ETA, SDIM, SAM, TWIN-V2, DARE and
MIRRN, built by name.

>>> import ifa_tf
>>> model = ifa_tf.zoo.build("ifa")               # default schema
>>> model = ifa_tf.zoo.build("twin", k=50)        # overrides are checked
>>> ifa_tf.zoo.list_models()
['avg_pooling', 'dare', 'din', 'din_full', 'eta', 'ifa', 'ifa_no_ram', 'mirrn', 'sam',
 'sdim', 'sim_hard', 'sim_soft', 'twin', 'twin_ram', 'twin_v2']

`ifa` and `ifa_no_ram` take the FSM's `feature_map`, `focusing_factor`,
`learnable_temperature`, `learnable_focusing_factor` and `exact_matches`; the models with
RAM take RAM's `ram_feature_map`, `ram_focusing_factor`, `ram_learnable_temperature` and
`ram_learnable_focusing_factor`.

The zoo's `ifa` is not the paper's map everywhere: its FSM uses the focused map with a
learned power per head (starting at 3) and its RAM the paper's elu+1 (`IFA_DEFAULTS`; the
evidence: `benchmarks/results/ifa_variants/`). Those defaults hold as a whole until
`feature_map` is given; from then on RAM's map follows `feature_map` unless
`ram_feature_map` is given too:

>>> model = ifa_tf.zoo.build("ifa")                                  # focused FSM, elu+1 RAM
>>> model = ifa_tf.zoo.build("ifa", feature_map="elu_plus_one")      # the paper's IFA
>>> model = ifa_tf.zoo.build("ifa", feature_map="relu")              # relu FSM and RAM
>>> model = ifa_tf.zoo.build("ifa", feature_map="relu", ram_feature_map="elu_plus_one")

Register your own with `@ifa_tf.zoo.register("name")` on a function
`builder(schema=None, **overrides) -> keras.Model`; its keyword parameters are the valid
overrides (a builder taking `**kwargs` validates them itself).
"""

import inspect

from ifa_tf.models import (AveragePoolingInterest, CandidateSetRanker, DAREInterest,
                           ETAInterest, FullTargetAttentionInterest, LinearAttentionInterest,
                           MIRRNInterest, RecentDINInterest, SAMInterest, SDIMInterest,
                           SIMHardInterest, SIMSoftInterest, TWINInterest, TWINV2Interest)

_REGISTRY = {}

# The linear attentions of the zoo's `ifa` and `ifa_no_ram` where `feature_map` is not
# given: the focused map with a learned power in the FSM (it concentrates on the events that
# tell a user's tastes, where elu+1 attends almost uniformly, as a mean does), the paper's
# elu+1 in RAM (a sharp RAM learns how many positives a request holds instead of ranking).
IFA_DEFAULTS = {"feature_map": "focused", "learnable_focusing_factor": True,
                "ram_feature_map": "elu_plus_one"}


def register(name):
    """Decorator adding a model builder to the zoo under `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"A zoo name must be a non-empty string. Received: name={name!r}")

    def decorator(builder):
        if name in _REGISTRY:
            raise ValueError(f"A model named {name!r} is already registered.")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models():
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def build(name, schema=None, **overrides):
    """Builds the registered model `name` for `schema`.

    Args:
        name: a registered name (`list_models()`).
        schema: a `FeatureSchema`, a dataset directory written by `ifa-data` or its
            `metadata.json` (the features that data holds), a schema dict or JSON file;
            None: the default schema.
        **overrides: the builder's options (`valid_overrides(name)`).

    Raises:
        ValueError: for an unknown name or override, listing the valid ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}. Registered models: {list_models()}")
    builder = _REGISTRY[name]
    valid = valid_overrides(name)
    if valid is not None:
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"Unknown overrides {unknown} for model {name!r}. "
                             f"Valid overrides: {sorted(valid)}")
    from ifa_tf.schema import resolve_schema

    return builder(schema=None if schema is None else resolve_schema(schema), **overrides)


def resolve_overrides(name, overrides):
    """`overrides` with the defaults `build(name, ...)` would apply made explicit (the zoo's
    `ifa` and `ifa_no_ram`: `IFA_DEFAULTS`, where `feature_map` is not given): what a
    saved config records, so that it still names the same model after a default changes."""
    defaults = getattr(_REGISTRY[name], "defaults", None)
    if defaults and "feature_map" not in overrides:
        return {**overrides, **{k: v for k, v in defaults.items() if k not in overrides}}
    return dict(overrides)


def valid_overrides(name):
    """The override names `build(name, ...)` accepts, or None if the builder takes any."""
    builder = _REGISTRY[name]
    declared = getattr(builder, "valid_overrides", None)
    if declared is not None:
        return tuple(declared)
    parameters = inspect.signature(builder).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return tuple(p.name for p in parameters if p.name != "schema")


def _keyword_parameters(function, exclude):
    return [p.name for p in inspect.signature(function).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in exclude]


_RANKER_OPTIONS = _keyword_parameters(CandidateSetRanker.__init__,
                                      exclude={"self", "interest", "schema", "use_ram"})


def _register_ranker(name, interest_class, use_ram, defaults=None, fixed=None):
    """Registers a `CandidateSetRanker` with `interest_class` as its sequence module. Its
    overrides are the ranker's options plus the module's constructor arguments; `defaults`
    (linear attention settings) apply as a whole unless `feature_map` is overridden;
    `fixed` ranker options are what the model is (`dare` decouples its embeddings), and
    another value for them is an error."""
    module_options = _keyword_parameters(interest_class.__init__, exclude={"self"})
    fixed = dict(fixed or {})

    def builder(schema=None, **overrides):
        for option, value in fixed.items():
            if overrides.get(option, value) != value:
                raise ValueError(f"{name} always has {option}={value!r}: it is what the "
                                 f"model is. Received: {option}={overrides[option]!r}")
        overrides = {**overrides, **fixed}
        given = overrides
        overrides = resolve_overrides(name, overrides)
        try:
            interest = interest_class(
                **{k: v for k, v in overrides.items() if k in module_options},
                name="interest")
        except ValueError as error:
            if overrides == given:
                raise
            raise ValueError(f"{error} ({name}'s defaults {defaults} apply where "
                             "`feature_map` is not given; pass feature_map= to choose "
                             "another map.)") from error
        ranker_options = {k: v for k, v in overrides.items() if k in _RANKER_OPTIONS}
        if "feature_map" in module_options and "ram_feature_map" not in overrides:
            # RAM follows the FSM's map unless `ram_feature_map` sets it apart: what
            # `feature_map` did before RAM had its own, so earlier configs build the same
            # model.
            ranker_options["ram_feature_map"] = interest.feature_map
            ranker_options.setdefault("ram_focusing_factor", interest.focusing_factor)
        return CandidateSetRanker(interest, schema=schema, use_ram=use_ram, name=name,
                                  **ranker_options)

    builder.valid_overrides = (*_RANKER_OPTIONS, *module_options)
    builder.defaults = dict(defaults or {})
    builder.__name__ = name
    builder.__doc__ = f"Builds `{name}`: {interest_class.__doc__.splitlines()[0]}"
    register(name)(builder)


_register_ranker("avg_pooling", AveragePoolingInterest, use_ram=False)
_register_ranker("din", RecentDINInterest, use_ram=False)
_register_ranker("din_full", FullTargetAttentionInterest, use_ram=False)
_register_ranker("sim_hard", SIMHardInterest, use_ram=False)
_register_ranker("sim_soft", SIMSoftInterest, use_ram=False)
_register_ranker("twin", TWINInterest, use_ram=False)
_register_ranker("eta", ETAInterest, use_ram=False)
_register_ranker("sdim", SDIMInterest, use_ram=False)
_register_ranker("dare", DAREInterest, use_ram=False, fixed={"decoupled_embeddings": True})
_register_ranker("mirrn", MIRRNInterest, use_ram=False)
_register_ranker("sam", SAMInterest, use_ram=False)
_register_ranker("twin_ram", TWINInterest, use_ram=True)  # IFA - FSM (paper Table 3)
_register_ranker("twin_v2", TWINV2Interest, use_ram=False)
_register_ranker("ifa_no_ram", LinearAttentionInterest, use_ram=False,  # IFA - RAM
                 defaults=IFA_DEFAULTS)
_register_ranker("ifa", LinearAttentionInterest, use_ram=True, defaults=IFA_DEFAULTS)
