"""Raw ids -> int64 ids inside a TensorFlow graph, exactly as `ifa-data from-log` maps them.

The converter (`log_converter.encode_ids`) maps each raw id by its own value: a positive
integer of 1 to 18 digits without a leading zero is kept, any other value becomes
`string_id(value)`, a keyed BLAKE2b-64 hash. `RawIdMapper` does the same with TensorFlow ops,
so a SavedModel can take raw string ids (the `serving_raw` signature) and give every one,
seen in training or not, the id the converter gives it:

- the field is stripped of leading and trailing whitespace, as the converter strips a log
  field (Python's `str.strip` set of whitespace characters);
- an empty value is padding (0);
- values listed in a vocabulary (`vocab_<role>.tsv`, carried as a SavedModel asset) are
  looked up in a hash table;
- the others take the integer rule or `string_id`, computed in the graph (BLAKE2b in
  uint64 ops, `string_id_tensor`). The table is therefore a fast path, not a source of
  truth: a value missing from it gets the same id.

A raw id holds at most `MAX_ID_BYTES` (1,024) UTF-8 bytes, as in the converter; the
mapping's memory and time grow with the ids' bytes, each id padded to its own 128-byte
blocks only (`string_id_tensor`). `serving_raw` checks every id's length before mapping.

TensorFlow's string ops run on the CPU; TF Serving places them there on a GPU machine too.
"""

import os

import numpy as np
import tensorflow as tf

from ifa_tf.data import log_converter

# Python's str.strip() removes the characters for which str.isspace() is true.
_WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
_STRIP = "^[{0}]+|[{0}]+$".format("".join(f"\\x{{{ord(c):x}}}" for c in _WHITESPACE))
_POSITIVE_INT = "[1-9][0-9]{0,17}"
MAX_ID_BYTES = log_converter.MAX_ID_BYTES
# A vocabulary line whose value holds a backslash was escaped by the converter; the table
# leaves such values to the hash (which gives them the same id).
_ESCAPED = "\\"

_IV = (0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
       0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179)
_SIGMA = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
          (14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3),
          (11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4),
          (7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8),
          (9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13),
          (2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9),
          (12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11),
          (13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10),
          (6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5),
          (10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0))
_MASK = 2**64 - 1
_BLOCK = 128
_DIGEST_BYTES = 8


_MIXES = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15), (0, 5, 10, 15),
          (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))


def _mix_round(v, m, add, xor, rotr):
    """One BLAKE2b round on the 16 working words `v` (a list) with the message words `m`
    already permuted for the round (`m[k]` = block[sigma[k]])."""
    for i, (a, b, c, d) in enumerate(_MIXES):
        v[a] = add(add(v[a], v[b]), m[2 * i])
        v[d] = rotr(xor(v[d], v[a]), 32)
        v[c] = add(v[c], v[d])
        v[b] = rotr(xor(v[b], v[c]), 24)
        v[a] = add(add(v[a], v[b]), m[2 * i + 1])
        v[d] = rotr(xor(v[d], v[a]), 16)
        v[c] = add(v[c], v[d])
        v[b] = rotr(xor(v[b], v[c]), 63)
    return v


def _keyed_state():
    """The BLAKE2b-64 state after the key block of `string_id`'s key (Python ints): every
    non-empty message starts from it."""
    key = log_converter._STRING_ID_KEY
    h = list(_IV)
    h[0] ^= 0x01010000 ^ (len(key) << 8) ^ _DIGEST_BYTES
    padded = key.ljust(_BLOCK, b"\0")
    words = [int.from_bytes(padded[8 * i:8 * i + 8], "little") for i in range(16)]
    v = h + list(_IV)
    v[12] ^= _BLOCK  # the byte counter; not the last block
    for round_index in range(12):
        v = _mix_round(v, [words[k] for k in _SIGMA[round_index % 10]],
                       lambda a, b: (a + b) & _MASK, lambda a, b: a ^ b,
                       lambda x, n: ((x >> n) | (x << (64 - n))) & _MASK)
    return [h[i] ^ v[i] ^ v[i + 8] for i in range(8)]


_KEYED_STATE = tuple(_keyed_state())


@tf.autograph.experimental.do_not_convert
def string_id_tensor(values):
    """`log_converter.string_id` of every element of a 1-D string tensor (non-empty values),
    as int64: keyed BLAKE2b-64 in uint64 ops, folded into 1..2^63-1.

    Memory and time are in proportion to the values' bytes: each value is zero-padded to
    its own whole 128-byte blocks (not to the longest value's), and block b is compressed
    for the values that have one. Two graph loops, over block indices and over BLAKE2b's 12
    rounds, keep the graph small (one round's ops), so that a signature using it traces in a
    fraction of a second."""
    values = tf.convert_to_tensor(values, tf.string)
    lengths = tf.cast(tf.strings.length(values, unit="BYTE"), tf.int64)
    num_blocks = tf.maximum((lengths + _BLOCK - 1) // _BLOCK, 1)
    most_blocks = tf.reduce_max(tf.concat([num_blocks, [0]], 0))
    # All values, each zero-padded to whole blocks, in one string: [blocks, 16] words.
    pad = tf.cast(num_blocks * _BLOCK - lengths, tf.int32)
    padding = tf.strings.substr(tf.constant(b"\0" * _BLOCK), tf.zeros_like(pad), pad)
    joined = tf.strings.reduce_join(tf.strings.join([values, padding]))
    blocks = tf.bitcast(tf.reshape(tf.io.decode_raw(joined, tf.int64, little_endian=True),
                                   [-1, 16]), tf.uint64)
    first_block = tf.cumsum(num_blocks, exclusive=True)  # each value's first row
    sigma = tf.constant([_SIGMA[r % 10] for r in range(12)], tf.int64)

    def rotr(x, n):
        return tf.bitwise.bitwise_or(tf.bitwise.right_shift(x, tf.constant(n, tf.uint64)),
                                     tf.bitwise.left_shift(x, tf.constant(64 - n, tf.uint64)))

    def compress(index, h):
        # The values with a block `index`, their state [8, k] and that block's words [16, k].
        active = tf.where(num_blocks > index)[:, 0]
        block = tf.transpose(tf.gather(blocks, tf.gather(first_block, active) + index))
        h_active = tf.transpose(tf.gather(h, active))
        shape = tf.shape(active)
        # The key block counted 128 bytes; each message block adds its own bytes.
        counter = tf.cast(_BLOCK + tf.minimum(tf.gather(lengths, active),
                                              _BLOCK * (index + 1)), tf.uint64)
        last = tf.where(tf.equal(index + 1, tf.gather(num_blocks, active)),
                        tf.constant(_MASK, tf.uint64), tf.constant(0, tf.uint64))
        v = tf.concat([h_active, tf.stack([tf.fill(shape, tf.constant(x, tf.uint64))
                                           for x in _IV])], 0)
        v = tf.tensor_scatter_nd_update(v, [[12], [14]], tf.stack(
            [tf.bitwise.bitwise_xor(v[12], counter), tf.bitwise.bitwise_xor(v[14], last)]))

        def one_round(round_index, v):
            m = tf.unstack(tf.gather(block, sigma[round_index]), num=16)
            mixed = _mix_round(tf.unstack(v, num=16), m, tf.add, tf.bitwise.bitwise_xor, rotr)
            return round_index + 1, tf.stack(mixed)

        _, v = tf.while_loop(lambda round_index, v: round_index < 12, one_round,
                             (tf.constant(0, tf.int64), v))
        updated = tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(h_active, v[:8]), v[8:])
        return index + 1, tf.tensor_scatter_nd_update(h, active[:, None],
                                                      tf.transpose(updated))

    # [values, 8]: rows, so that a block's values are gathered and written back as rows.
    # (From a NumPy array: a graph's tf.constant of a list of Python ints past 2^63 goes
    # through float64.)
    initial = tf.tile(tf.constant(np.array([_KEYED_STATE], np.uint64)), [tf.size(values), 1])
    _, h = tf.while_loop(lambda index, h: index < most_blocks, compress,
                         (tf.constant(0, tf.int64), initial))
    digest = h[:, 0]  # the first 8 output bytes, read little-endian, are the first word
    # digest mod (2^63 - 1): 2^63 = 1 (mod 2^63 - 1), so fold the top bit into the rest.
    top = tf.bitwise.right_shift(digest, tf.constant(63, tf.uint64))
    folded = tf.bitwise.bitwise_and(digest, tf.constant(2**63 - 1, tf.uint64)) + top
    folded = tf.where(folded >= 2**63 - 1, folded - (2**63 - 1), folded)
    return tf.bitcast(folded, tf.int64) + 1


def strip(values):
    """Python's `str.strip()` of every element of a string tensor."""
    return tf.strings.regex_replace(values, _STRIP, "")


def encode_ids_tensor(values, table=None):
    """Raw string ids (a string tensor of any shape) -> int64 ids of the same shape, as the
    converter maps a log field: stripped, positive integers kept, other values
    `string_id`; empty values are padding (0). `table`: a lookup table of known values
    (default -1 for the others)."""
    return encode_ids_tensors([values], [table])[0]


def encode_ids_tensors(values, tables):
    """`encode_ids_tensor` of several tensors (each with its table or None) at once: one
    hash computation for all of them."""
    values = [tf.convert_to_tensor(v, tf.string) for v in values]
    flats = [strip(tf.reshape(v, [-1])) for v in values]
    known = tf.concat([table.lookup(flat) if table is not None else
                       tf.fill(tf.shape(flat), np.int64(-1))
                       for flat, table in zip(flats, tables)], 0)
    flat = tf.concat(flats, 0)
    empty = tf.equal(flat, "")
    integer = tf.logical_and(tf.strings.regex_full_match(flat, _POSITIVE_INT),
                             tf.less(known, 0))
    numbers = tf.strings.to_number(tf.where(integer, flat, "0"), tf.int64)
    hashed = tf.logical_not(empty | integer | tf.greater_equal(known, 0))
    positions = tf.where(hashed)
    hashes = string_id_tensor(tf.gather_nd(flat, positions))
    ids = tf.where(integer, numbers, tf.where(empty, tf.zeros_like(known), known))
    ids = tf.tensor_scatter_nd_update(ids, positions, hashes)
    sizes = [tf.size(f) for f in flats]
    return [tf.reshape(part, tf.shape(v, out_type=tf.int64))
            for part, v in zip(tf.split(ids, sizes), values)]


def lookup_table(vocabulary_file):
    """A `StaticHashTable` raw value -> id from a usable vocabulary file (see
    `write_lookup_file`); its path becomes a SavedModel asset when a tracked module holds
    the table."""
    initializer = tf.lookup.TextFileInitializer(
        vocabulary_file, key_dtype=tf.string, key_index=1, value_dtype=tf.int64,
        value_index=0, delimiter="\t")
    return tf.lookup.StaticHashTable(initializer, default_value=-1)


def write_lookup_file(vocabulary_path, output_path):
    """Copies the lines of a converter vocabulary (`<id>\\t<value>`) that a text-file table
    reads back verbatim: values without escapes (backslash). Returns the number of lines
    kept and dropped; dropped values still map right, through the hash."""
    kept = dropped = 0
    with open(vocabulary_path, encoding="utf-8", newline="\n") as source, \
            open(output_path, "w", encoding="utf-8", newline="\n") as target:
        for line in source:
            value = line.rstrip("\n").split("\t", 1)[1]
            if _ESCAPED in value or value != value.strip() or not value:
                dropped += 1
                continue
            target.write(line if line.endswith("\n") else line + "\n")
            kept += 1
    return kept, dropped


def vocabulary_files(dataset):
    """`{role: path}` of the vocabularies of a converted dataset: its directory or its
    metadata.json. Roles whose ids were all kept integers have none."""
    from ifa_tf.data import records

    directory = dataset if os.path.isdir(dataset) else os.path.dirname(os.path.abspath(dataset))
    metadata = records.read_metadata(dataset)
    files = {}
    for role, name in metadata.get("vocabularies", {}).items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: vocabulary of {role} ids listed in "
                                    f"{os.path.join(directory, records.METADATA_FILENAME)} "
                                    "is missing")
        files[role] = path
    return files


def role_of(feature_name):
    """The converter role whose ids a feature holds: `user_id` -> user, `seq_item_id` and
    `cand_item_id` -> item, `*_category_id` -> category; other names keep their stem."""
    for prefix in ("seq_", "cand_"):
        if feature_name.startswith(prefix):
            feature_name = feature_name[len(prefix):]
            break
    return feature_name[:-len("_id")] if feature_name.endswith("_id") else feature_name
