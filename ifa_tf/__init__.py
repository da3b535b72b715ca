"""ifa_tf: rank whole candidate sets against entire lifelong behaviour sequences.

    import ifa_tf
    model = ifa_tf.zoo.build("ifa")
    model.compile()
    model.fit(dataset)
"""

from ifa_tf import layers, models, zoo
from ifa_tf.schema import FeatureSchema, default_schema

__version__ = "0.1.0"

__all__ = ["FeatureSchema", "default_schema", "layers", "models", "zoo"]
