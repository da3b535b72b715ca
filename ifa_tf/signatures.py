"""The names an export fixes, for code that must not load TensorFlow to know them (the
serving clients, `ifa-query`): its signatures, their outputs and state inputs, and the
metadata file beside a version (`read_metadata`). `ifa_tf.export` writes by these names.
"""

import json
import os

SIGNATURE_NAME = "serving_default"
RAW_SIGNATURE_NAME = "serving_raw"
SCORE = "score"
RANKED_INDICES = "ranked_indices"
RANKED_ITEM_IDS = "ranked_item_ids"
RANKED_RAW_ITEM_IDS = "ranked_raw_item_ids"
ASSETS_EXTRA = "assets.extra"
METADATA_FILE = "ifa_export_metadata.json"

# Stateful IFA: signatures and the names of their state inputs and outputs.
USER_STATE_SIGNATURE = "user_state"
UPDATE_STATE_SIGNATURE = "update_state"
RANK_WITH_STATE_SIGNATURE = "rank_with_state"
STATE_SIGNATURES = (USER_STATE_SIGNATURE, UPDATE_STATE_SIGNATURE, RANK_WITH_STATE_SIGNATURE)
STATE = "state"
STATE_TIME = "state_time"
STATE_MODEL = "state_model"
NOW = "now"
EVENT_TIME = "seq_event_time"


def read_metadata(export_dir):
    """The export metadata of a version directory, or None when it has none."""
    path = os.path.join(export_dir, ASSETS_EXTRA, METADATA_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
