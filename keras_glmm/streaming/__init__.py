"""Data larger than memory: fitting a GLMM from CSV or Parquet files read in chunks.

```python
source = kg.read_parquet("clicks/*.parquet")          # or kg.read_csv("clicks/*.csv")
model = kg.glmm("y ~ x + (1|user) + (1|item)", source, family="binomial")
```

A formula model needs, before its first step, everything `Design.from_data` learns
from a data frame (the level vocabulary of every grouping factor, each level's row
count, the coding of the fixed effects and of the response) and a starting point
(the GLM fit of `keras_glmm.initialization`). With files, `scan` learns all of it in
one pass over the chunks, holding only what must be held: the vocabularies and
their counts, the distinct values of categorical fixed-effect columns, and a
uniform random sample of rows (a bounded reservoir, 100,000 rows by default). The
sample stands in for the data where a frame is needed: it fixes formulaic's
fixed-effects coding (with one extra row for each category of a categorical
column that the files hold but the sample missed, so no category is lost; the
state of stateful transforms such as `center()` or `scale()` is the sample's) and
gives the GLM starting point. The level vocabularies, their order and the counts
are those of `Design.from_data` on all the rows (`_group_levels` orders a set of
values, so it is called on the distinct values only).

`GLMM.fit(source)` fits files whose rows fit the model's `memory_budget` as the data
frame they hold (`in_memory`: the engine, standard errors). Larger files, and files
under a multi-worker strategy (a share per worker), it trains from a `tf.data`
pipeline: chunks are read and turned into model arrays (`Design.arrays`), shuffled
by `block_shuffle` (a buffer of at most `shuffle_buffer` rows is permuted and
emitted in batches; shuffling single rows with `Dataset.shuffle` would cost far
more than a training step), and prefetched. When the data fit in the shuffle buffer they are read once and kept.
The final ELBO of a streamed fit is one more pass over the files; results that need
every training row in memory (`vcov`, `coef_table`, `fitted`, `residuals`,
`simulate`) raise an error saying what to do instead.

Bad data fail with the file and the line: a malformed CSV row, a non-numeric
value in a numeric column, a missing value (under `na_action="raise"`), a response
outside the family's support, a file without a needed column. The index of each
chunk is the line number in the CSV file (the header is line 1, the first data row
line 2; one line per row, as pandas' chunks count rows: blank lines and quoted
fields holding line breaks shift the numbers, except in pandas' own parser errors,
which count lines) or the 1-based row number in a Parquet file.

Files must not change while a model is built and fitted from them: the scan
records each file's size, modification time (ns) and row count (`FileStamp`), and
every later pass (each epoch, the final ELBO, a streamed prediction pass) checks
them before it reads a file and the row count after; the fit also checks them at the
start of every epoch. A file that changed, was truncated or vanished stops the fit
with a `FilesChangedError` naming the file and what changed (size, mtime, rows:
expected and found), never a TensorFlow error from inside the `tf.data` pipeline
(errors raised while the pipeline reads are re-raised as themselves, see
`raising_read_errors`). A file rewritten with the same size within the file
system's clock tick is the one change these checks cannot see.

Column types are fixed by the first chunk that holds the column, as a reader
infers them from the first rows: a column read as numbers there must hold numbers
everywhere (the error names the file, line and value; pass `dtype={"col": str}`
to `read_csv` for a categorical column whose first values look like numbers);
the response, offsets and weights must be numeric. A random slope on a factor
(`(gender | school)`) is coded like a categorical fixed effect: the scan learns its
values from every chunk, so the coding is that of all the rows. Grouping levels
get the keys of `keras_glmm.levels`, the design's own. Integer columns
become float64 when some chunk holds floats or missing values, as they would
when read whole.

The package, along the data's path: `sources` (the files, read in chunks),
`file_stamps` (what the scan saw of each file), `reader` (checked, typed chunks and
their model arrays), `scanning` (the scan), `in_memory` (files that fit in memory,
fitted as a data frame) and `pipeline` (the `tf.data` batches of a streamed fit).
"""

from keras_glmm.streaming.file_stamps import FileStamp, FilesChangedError
from keras_glmm.streaming.in_memory import in_memory_bytes, in_memory_frame
from keras_glmm.streaming.pipeline import (
    BATCH_SIZE,
    MIN_EPOCH_STEPS,
    SHUFFLE_BUFFER,
    FilesCheck,
    batches,
    block_shuffle,
    dataset,
    fitted_from_files_error,
    multi_worker_shares,
    raising_read_errors,
    signature,
    worker_files,
)
from keras_glmm.streaming.scanning import MAX_CATEGORIES, SAMPLE_ROWS, Scan, recount, scan
from keras_glmm.streaming.sources import (
    CHUNK_ROWS,
    HEAD_ROWS,
    CSVSource,
    ParquetSource,
    Source,
    is_source,
    read_csv,
    read_parquet,
)

__all__ = [
    "CSVSource",
    "FileStamp",
    "FilesChangedError",
    "FilesCheck",
    "ParquetSource",
    "Scan",
    "Source",
    "batches",
    "block_shuffle",
    "dataset",
    "in_memory_frame",
    "read_csv",
    "raising_read_errors",
    "read_parquet",
    "recount",
    "scan",
]
