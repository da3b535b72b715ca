"""Constructor-argument checks shared by the layers: errors name the argument and value."""

import keras


def check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def check_int_in_range(name, value, low, high):
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"`{name}` must be an integer in [{low}, {high}]. "
                         f"Received: {name}={value!r}")


def check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")


def check_seed(name, seed):
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"`{name}` must be None or a non-negative integer. "
                         f"Received: {name}={seed!r}")


def check_units(name, units):
    if isinstance(units, int) or not all(
            isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in units):
        raise ValueError(f"`{name}` must be a list of positive integers. "
                         f"Received: {name}={units!r}")
    return list(units)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}. Received: {name}={value!r}")


def check_dtype_policy(name, policy):
    """The name of a floating Keras dtype policy (e.g. `"mixed_bfloat16"`)."""
    try:
        resolved = keras.dtype_policies.get(policy)
    except (ValueError, TypeError):
        resolved = None
    if resolved is None or not resolved.compute_dtype.startswith(("float", "bfloat")):
        raise ValueError(f"`{name}` must be a floating Keras dtype policy such as "
                         f"'mixed_bfloat16' or 'float32'. Received: {name}={policy!r}")
    return resolved.name


def clone_initializer(initializer):
    """A fresh initializer of the same config, so sublayers never share seeded state."""
    return keras.initializers.get(keras.initializers.serialize(initializer))
