import numpy as np
import pyarrow as pa

from rayvid import schema


def test_listed_size_reads_a_null_size_as_unknown_however_a_batch_carries_it():
    # a null int64 becomes NaN in a numpy batch (what Ray Data hands a stage)
    as_numpy = pa.array([7, None, -1], pa.int64()).to_numpy(zero_copy_only=False)
    assert np.isnan(as_numpy[1])
    assert [schema.listed_size(x) for x in as_numpy] == [7, -1, -1]
    assert [schema.listed_size(x) for x in (None, np.int64(2**40), 0, float("inf"))] == [-1, 2**40, 0, -1]


def test_head_columns_follow_reused_from_or_close_a_schema_without_it():
    head = [schema.embedding_field(4), *schema.clip_fields()]
    names = schema.with_head(schema.PREDICTIONS_SCHEMA, head).names
    assert names[names.index("reused_from") + 1:names.index("model")] == [f.name for f in head]
    assert schema.with_head(schema.ERRORS_SCHEMA, head).names == schema.ERRORS_SCHEMA.names + [f.name for f in head]
    assert schema.with_head(schema.PREDICTIONS_SCHEMA, []) is schema.PREDICTIONS_SCHEMA
    assert schema.with_head(schema.PREDICTIONS_SCHEMA, head).metadata == schema.PREDICTIONS_SCHEMA.metadata


def test_outputs_use_plain_arrow_types_that_other_engines_read():
    def plain(t):
        if isinstance(t, pa.ExtensionType):
            return False
        return all(plain(t.field(i).type) for i in range(t.num_fields)) if t.num_fields else True

    for s in (schema.PREDICTIONS_SCHEMA, schema.ERRORS_SCHEMA, schema.VIDEOS_SCHEMA,
              schema.with_head(schema.PREDICTIONS_SCHEMA, [schema.embedding_field(8), schema.boxes_field()])):
        assert all(plain(f.type) for f in s), s
        assert s.metadata[b"rayvid.schema_version"] == schema.SCHEMA_VERSION.encode()
