"""Binary text classification as chain tasks: IMDB reviews, GLUE SST-2, and an offline synthetic set.

Every text task reads records {text, label} from a random-access source, turns the
text into `max_len` word ids with a `Vocabulary` of the training split, and gives
every stage the same binary label ("sentiment"). The pieces follow the standard
Keras IMDB recipe (`Tokenizer` + `pad_sequences(maxlen=256)`), so that a chain
trained here is comparable with the Keras baseline:

  text -> lowercase, HTML line breaks removed, regex words -> ids (0 padding,
  1 out of vocabulary, 2.. the top `vocab_size - 2` training words) -> the last
  `max_len` ids, zero-padded in front (Keras' "pre" padding and truncation, so a
  recurrent encoder that reads the last step sees the end of the text)

The vocabulary is part of the experiment: it is saved as `<workdir>/vocab.json`
the first time and read back by every later run in that workdir (resume, eval,
export), so ids never change under a trained model.

Datasets (`config.data.name`):
  imdb_reviews         TFDS, 25k/25k movie reviews ("text", "label"); eval split "test"
  glue/sst2            TFDS, 67k/872 sentences ("sentence", "label"); eval split
                       "validation" (its "test" split has no labels)
  synthetic_sentiment  generated in memory from `config.data.seed` (rule: `synthetic_sentences`):
                       `config.data.train_size` (if the config has it, else 20000) training
                       and `config.data.eval_size` eval sentences
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from chainjax.data import base
from chainjax.data import pipeline
from chainjax.data import tfds_data

TEXT_DATASETS = ("imdb_reviews", "glue/sst2", "synthetic_sentiment")
PAD_ID, OOV_ID = 0, 1
VOCAB_FILE = "vocab.json"
LABEL_NAME = "sentiment"

# name -> (text feature, label feature, splits without labels).
_TFDS_FEATURES = {
    "imdb_reviews": ("text", "label", ("unsupervised",)),
    "glue/sst2": ("sentence", "label", ("test",)),
}

_LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters/digits, with inner apostrophes ("don't")


def words(text: str) -> list[str]:
  """The lowercase words of `text` (HTML `<br />` counts as a space)."""
  return _WORD.findall(_LINE_BREAK.sub(" ", text.lower()))


def as_text(value: Any) -> str:
  """A record's text feature (str, bytes, or a 0-d numpy array of either) as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  return str(value)


class Vocabulary:
  """Word ids: 0 padding, 1 out of vocabulary, `i + 2` for `words[i]` (most frequent first).

  Attributes:
    size: the id range `[0, size)`, i.e. `config.data.vocab_size` (the embedding
      table's rows); `len(words) <= size - 2`, fewer when the training split has
      fewer distinct words.
    words: the kept words, by descending training count, ties alphabetically.
  """

  def __init__(self, words: Sequence[str], size: int):
    if len(words) > size - 2:
      raise ValueError(f"{len(words)} words do not fit {size} ids (2 are reserved)")
    self.words, self.size = tuple(words), int(size)
    self._ids = {w: i + 2 for i, w in enumerate(self.words)}

  @classmethod
  def build(cls, texts: Iterable[str], size: int) -> "Vocabulary":
    """The top `size - 2` words of `texts` by count (ties broken alphabetically, so the result is deterministic)."""
    if size < 3:
      raise ValueError(f"a vocabulary needs at least 3 ids (padding, OOV, one word), got {size}")
    counts = collections.Counter()
    for text in texts:
      counts.update(words(text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return cls([w for w, _ in ranked[: size - 2]], size)

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocabulary) and (self.size, self.words) == (other.size, other.words)

  def __hash__(self) -> int:
    return hash((self.size, self.words))

  def __repr__(self) -> str:
    return f"Vocabulary(size={self.size}, words={len(self.words)})"

  def id(self, word: str) -> int:
    return self._ids.get(word, OOV_ID)

  def encode(self, text: str) -> list[int]:
    """The ids of the words of `text`, unpadded."""
    ids = self._ids
    return [ids.get(w, OOV_ID) for w in words(text)]

  def save(self, path: str | epath.Path, **info) -> None:
    """Writes the vocabulary (and `info`, for people reading the file) as JSON; `path` may be gs://."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps({"vocab_size": self.size, "pad_id": PAD_ID, "oov_id": OOV_ID, **info,
                               "words": list(self.words)}))
    tmp.rename(path)

  @classmethod
  def load(cls, path: str | epath.Path) -> "Vocabulary":
    data = json.loads(epath.Path(path).read_text())
    return cls(data["words"], data["vocab_size"])


@dataclasses.dataclass(frozen=True)
class Tokenize:
  """Record {text_key: text, label_key: 0/1} -> {"inputs": int32 [max_len], "labels": (float32 label,) * num_stages}.

  `truncating` says which end of a long text is cut, `padding` which end of a
  short one gets the zeros ("pre" = the front, as Keras `pad_sequences`).
  """

  vocab: Vocabulary
  text_key: str
  label_key: str
  max_len: int
  num_stages: int
  padding: str = "pre"
  truncating: str = "pre"

  def __post_init__(self):
    for field in ("padding", "truncating"):
      if getattr(self, field) not in ("pre", "post"):
        raise ValueError(f"Tokenize.{field} must be 'pre' or 'post', got {getattr(self, field)!r}")

  def ids(self, text: str) -> np.ndarray:
    """`text` as exactly `max_len` int32 ids."""
    ids = self.vocab.encode(text)
    if len(ids) > self.max_len:
      ids = ids[-self.max_len:] if self.truncating == "pre" else ids[: self.max_len]
    out = np.zeros((self.max_len,), np.int32)
    if ids:
      if self.padding == "pre":
        out[self.max_len - len(ids):] = ids
      else:
        out[: len(ids)] = ids
    return out

  def __call__(self, record: dict[str, Any]) -> pipeline.Example:
    label = np.float32(np.asarray(record[self.label_key]))
    return {"inputs": self.ids(as_text(record[self.text_key])), "labels": (label,) * self.num_stages}


# --------------------------------------------------------------------------------------------
# synthetic_sentiment: sentences with a sentiment rule that needs word order (negation).
# --------------------------------------------------------------------------------------------

FILLER_WORDS = tuple("""
the a an this that these those it its he she they we i you his her their our my your one
and or but so with of in on at to from by for about after before during while as than into over
under between through around near without within
was is are were be been being has have had did does do will would could should can may might
saw watched seemed felt looked went came made took got told showed said kept left found gave
met called played wrote moved turned started ended began opened closed waited walked talked
then there here again also just still really quite very rather some many few two three four
five first second third last next other same whole long short old new early late young big small
movie film story plot actor actress scene scenes character characters director script camera music
soundtrack ending beginning middle time year day night evening morning week city house home family
friend friends man woman child children people world life way thing part place moment minute hour
screen theater ticket popcorn sequel series episode book novel version role cast crew studio budget
audience critic review idea style tone color sound voice dialogue line word shot frame set costume
light shadow car train road river sea mountain forest town village school office war journey trip
dinner party wedding game team brother sister mother father uncle doctor teacher soldier police
detective king queen island street window door table letter phone summer winter weekend
""".split())

POSITIVE_WORDS = tuple("""
good great excellent wonderful amazing superb brilliant fantastic delightful enjoyable charming
beautiful clever funny gripping masterful perfect stunning touching witty lovely solid memorable
fresh powerful engaging impressive best moving fun splendid
""".split())

NEGATIVE_WORDS = tuple("""
bad awful terrible boring dull weak poor horrible dreadful lame mediocre tedious bland clumsy
stupid annoying painful messy forgettable worst ugly silly pointless shallow sloppy flat
predictable disappointing incoherent unwatchable
""".split())

NEGATORS = ("not", "never", "hardly")

_NUM_CUES = (1, 3, 5)  # sentiment words per sentence: odd, so the vote never ties
_CUE_PROBS = (0.4, 0.4, 0.2)
_NEGATION_PROB = 0.3
_FILLER_LEN = (6, 24)  # inclusive range of filler words per sentence
_MAX_DECOYS = 2  # negators before filler words, which flip nothing


def synthetic_sentences(seed: int, n: int, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`n` sentences as UTF-8 bytes [n] (object) and their labels int64 [n], a pure function of the arguments.

  A sentence is 6-24 neutral filler words with 1, 3 or 5 sentiment cues inserted
  between them. A cue is a positive or negative word, preceded with probability
  0.3 by a negator ("not", "never", "hardly") that flips it: "not good" is
  negative. Up to 2 decoy negators stand before filler words, where they change
  nothing ("never the"). The label is 1 iff the flipped cues vote positive (an odd
  count, so never a tie); each cue's vote is a fair coin, so labels are balanced.
  The rule needs word order: "not good bad great" and "good not bad great" hold
  the same words and opposite labels. There is no label noise: a sequence model
  can learn it exactly.
  """
  rng = np.random.default_rng([seed, stream])
  max_cues = max(_NUM_CUES)
  num_cues = rng.choice(_NUM_CUES, size=n, p=_CUE_PROBS)
  votes = rng.integers(0, 2, size=(n, max_cues)) * 2 - 1  # [n, max_cues], +1 positive
  negated = rng.random((n, max_cues)) < _NEGATION_PROB
  negator = rng.integers(0, len(NEGATORS), size=(n, max_cues + _MAX_DECOYS))
  word_draw = rng.random((n, max_cues))
  filler_len = rng.integers(_FILLER_LEN[0], _FILLER_LEN[1] + 1, size=n)
  fillers = rng.integers(0, len(FILLER_WORDS), size=(n, _FILLER_LEN[1]))
  num_decoys = rng.integers(0, _MAX_DECOYS + 1, size=n)
  decoy_draw = rng.random((n, _FILLER_LEN[1]))  # the decoys go before the fillers with the smallest draws
  slot_draw = rng.random((n, max_cues))  # where each cue goes between the fillers

  texts, labels = np.empty((n,), object), np.empty((n,), np.int64)
  for i in range(n):
    k, length = int(num_cues[i]), int(filler_len[i])
    units = [[FILLER_WORDS[j]] for j in fillers[i, :length]]  # a negator stays with the word after it
    for d, j in enumerate(np.argsort(decoy_draw[i, :length])[: num_decoys[i]]):
      units[j].insert(0, NEGATORS[negator[i, max_cues + d]])
    slots = np.sort((slot_draw[i, :k] * (length + 1)).astype(int))
    for c in range(k - 1, -1, -1):  # right to left, so earlier slots keep their place
      surface_positive = (votes[i, c] > 0) != negated[i, c]
      vocab = POSITIVE_WORDS if surface_positive else NEGATIVE_WORDS
      cue = [vocab[int(word_draw[i, c] * len(vocab))]]
      if negated[i, c]:
        cue.insert(0, NEGATORS[negator[i, c]])
      units.insert(slots[c], cue)
    texts[i] = " ".join(w for unit in units for w in unit).encode("utf-8")
    labels[i] = int(votes[i, :k].sum() > 0)
  return texts, labels


@functools.lru_cache(maxsize=4)
def synthetic_sources(seed: int, train_size: int, eval_size: int) -> tuple[pipeline.ArraySource, pipeline.ArraySource]:
  """The train and eval sources of `synthetic_sentiment`: records {"text": bytes, "label": int64}.

  The two sets come from separate random streams of `seed`, so changing one size
  leaves the other set as it was.
  """
  train = synthetic_sentences(seed, train_size, stream=0)
  evaluation = synthetic_sentences(seed, eval_size, stream=1)
  return (pipeline.ArraySource(text=train[0], label=train[1]),
          pipeline.ArraySource(text=evaluation[0], label=evaluation[1]))


# --------------------------------------------------------------------------------------------
# The task.
# --------------------------------------------------------------------------------------------


def read_texts(source, key: str, chunk: int = 1024) -> Iterator[str]:
  """Every record's `key` feature as str, in order.

  Reads `chunk` records per call where the source has `__getitems__` (ArrayRecord:
  ~3x faster than one by one over IMDB's 25k reviews).
  """
  get_many = getattr(source, "__getitems__", None)
  for start in range(0, len(source), chunk):
    keys = list(range(start, min(start + chunk, len(source))))
    for record in get_many(keys) if get_many is not None else [source[i] for i in keys]:
      yield as_text(record[key])


_BUILT: dict[tuple, Vocabulary] = {}  # vocabularies built in this process, by what they were built from


def task_vocabulary(config, workdir: str | None, train_source, text_key: str) -> Vocabulary:
  """`<workdir>/vocab.json` if it exists, else the vocabulary of the training split.

  A new vocabulary is written to the workdir by `TextTask.save`, which training calls
  once the config and data have been validated: a run that fails validation leaves
  the workdir untouched.
  """
  data = config.data
  path = epath.Path(workdir) / VOCAB_FILE if workdir else None
  if path is not None and path.exists():
    vocab = Vocabulary.load(path)
    if vocab.size != data.vocab_size:
      raise tfds_data.DataError("vocab_size", f"{data.vocab_size} differs from the {vocab.size} ids of the "
                                f"vocabulary this workdir was trained with ({path}); set it to {vocab.size} or "
                                "use a new workdir")
    return vocab
  key = (data.name, data.data_dir, data.split_train, data.seed, len(train_source), data.vocab_size)
  if key not in _BUILT:
    _BUILT[key] = Vocabulary.build(read_texts(train_source, text_key), data.vocab_size)
    logging.info("text: built a vocabulary of %d words from %d %s %r records", len(_BUILT[key].words),
                 len(train_source), data.name, data.split_train)
  return _BUILT[key]


def _open_tfds(data, field: str, split: str, builder, unlabeled: Sequence[str]):
  """`open_split` of a labelled split; a split without labels is a `DataError` naming `field`."""
  if split in unlabeled:
    labelled = [s for s in builder.info.splits if s not in unlabeled]
    raise tfds_data.DataError(field, f"split {split!r} of {data.name} has no labels; use one of: "
                              f"{', '.join(labelled)}")
  return tfds_data.open_split(builder, split, field)


def _check_embedding(config) -> None:
  """Ids must fit the first embedding stage's table (out-of-range ids would be clamped silently)."""
  for i, stage in enumerate(config.chain.stages):
    if stage.type == "embedding":
      if stage.vocab_size < config.data.vocab_size:
        raise tfds_data.DataError("vocab_size", f"{config.data.vocab_size} ids do not fit the "
                                  f"{stage.vocab_size} rows of chain.stages[{i}] ({stage.name}); give that "
                                  f"stage vocab_size={config.data.vocab_size}")
      return


class TextTask(pipeline.GrainTask):
  """A text `GrainTask` whose vocabulary belongs in the workdir."""

  def save(self, workdir: str) -> None:
    """Writes `<workdir>/vocab.json` unless it is there (call on process 0)."""
    path = epath.Path(workdir) / VOCAB_FILE
    if not path.exists():
      self.transform.vocab.save(path, dataset=self.name)


def text_task(config, workdir: str | None = None) -> TextTask:
  """The task of a text dataset named by `config.data.name` (one of `TEXT_DATASETS`).

  `workdir` holds the vocabulary (`vocab.json`); None keeps it in memory only.
  """
  data = config.data
  if data.name not in TEXT_DATASETS:
    raise tfds_data.DataError("name", f"{data.name!r} is not a text dataset; text datasets: "
                              f"{', '.join(TEXT_DATASETS)}")
  if data.max_len < 1:
    raise tfds_data.DataError("max_len", f"must be > 0, got {data.max_len}")
  if data.vocab_size < 3:
    raise tfds_data.DataError("vocab_size", f"must be >= 3 (padding, OOV and a word), got {data.vocab_size}")
  _check_embedding(config)

  test = None
  if data.name == "synthetic_sentiment":
    if data.split_test:
      raise tfds_data.DataError("split_test", f"{data.split_test!r}: synthetic_sentiment has only a training "
                                "and an eval set; leave it empty")
    train, evaluation = synthetic_sources(data.seed, data.train_size, data.eval_size)
    text_key, label_key = "text", "label"
  else:
    text_key, label_key, unlabeled = _TFDS_FEATURES[data.name]
    if data.name.startswith("glue/"):
      # TFDS registers its legacy text builders lazily; glue is not found by name until imported.
      import tensorflow_datasets.text.glue  # pylint: disable=g-import-not-at-top,unused-import
    builder = tfds_data.open_builder(data.name, data.data_dir or None)
    train = _open_tfds(data, "split_train", data.split_train, builder, unlabeled)
    evaluation = _open_tfds(data, "split_eval", data.split_eval, builder, unlabeled)
    if data.split_test:
      test = _open_tfds(data, "split_test", data.split_test, builder, unlabeled)
    for field, source in (("split_train", train), ("split_eval", evaluation), ("split_test", test)):
      if source is not None:
        _check_first_label(data, field, source, label_key)

  vocab = task_vocabulary(config, workdir, train, text_key)
  num_stages = len(config.chain.stages)
  transform = Tokenize(vocab, text_key, label_key, data.max_len, num_stages,
                       padding=data.padding, truncating=data.truncating)
  specs = tuple(base.LabelSpec(name=LABEL_NAME) for _ in range(num_stages))
  task = TextTask(name=data.name, train_source=train, eval_source=evaluation, transform=transform,
                            input_shape=(data.max_len,), input_dtype=np.int32, label_specs=specs,
                            seed=config.seed, num_threads=data.num_threads, prefetch=data.prefetch)
  task.test_source = test
  return task


def _check_first_label(data, field: str, source, label_key: str) -> None:
  """Record 0 of a split must carry a 0/1 label (unlabelled splits store -1)."""
  label = int(np.asarray(source[0][label_key]))
  if label not in (0, 1):
    raise tfds_data.DataError(field, f"record 0 of {data.name} split {data[field]!r} has label {label}, "
                              "not 0/1: the split has no labels; pick a labelled one")
