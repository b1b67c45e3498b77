"""Text tasks: vocabulary, tokenization, the workdir vocabulary, TFDS text datasets, synthetic sentiment."""

import contextlib
import json
from unittest import mock

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from tensorflow_datasets.testing import mocking as tfds_mocking

from chainjax import chain as chain_lib
from chainjax import config as config_lib
from chainjax import experiment
from chainjax import stages
from chainjax.data import base
from chainjax.data import pipeline
from chainjax.data import text
from chainjax.data.tfds_data import DataError
from tests import helpers


def text_config(name="synthetic_sentiment", *, train_size=400, eval_size=64, vocab_size=20000, max_len=16,
                data_dir="", split_eval="test", seed=0):
  """A 2-stage chain (embedding, LSTM) over a small text task."""
  config = config_lib.base_config()
  config.data.name = name
  config.data.train_size = train_size
  config.data.eval_size = eval_size
  config.data.vocab_size = vocab_size
  config.data.max_len = max_len
  config.data.data_dir = data_dir
  config.data.split_eval = split_eval
  config.data.seed = seed
  config.data.num_threads = 1
  config.batch_size = 8
  config.eval_batch_size = 16
  config.chain.stages = [
      stages.stage_config("embedding", name="embed", vocab_size=vocab_size, features=8, head={"enabled": False}),
      stages.stage_config("lstm", name="encoder", features=8),
  ]
  return config


# ------------------------------------------------------------------------------------------------
# Vocabulary and Tokenize.
# ------------------------------------------------------------------------------------------------


def test_words_lowercase_regex_and_html_breaks():
  assert text.words("A <br />great<BR/>film, isn't it? Caf\u00e9_noir 42") == [
      "a", "great", "film", "isn't", "it", "caf\u00e9", "noir", "42"]


def test_vocabulary_top_n_ties_oov_and_padding():
  texts = ["b a a c", "a b <br />C d", "e"]  # a:3, b:2, c:2, d:1, e:1
  vocab = text.Vocabulary.build(texts, size=5)
  assert vocab.words == ("a", "b", "c")  # b and c tie at 2: alphabetical; d, e do not fit 5 - 2 ids
  assert [vocab.id(w) for w in ("a", "b", "c", "d", "br")] == [2, 3, 4, text.OOV_ID, text.OOV_ID]
  assert vocab.encode("C zz a") == [4, 1, 2]
  assert text.PAD_ID == 0 and text.OOV_ID == 1
  assert text.Vocabulary.build(reversed(texts), size=5) == vocab  # order of the texts does not matter
  small = text.Vocabulary.build(["x y"], size=100)  # fewer words than ids: the id range stays 100
  assert small.words == ("x", "y") and small.size == 100


def test_vocabulary_save_load(tmp_path):
  vocab = text.Vocabulary.build(["b a a"], size=10)
  path = tmp_path / "sub" / "vocab.json"
  vocab.save(path, dataset="x")
  assert text.Vocabulary.load(path) == vocab
  assert json.loads(path.read_text())["vocab_size"] == 10


def test_tokenize_truncates_and_pads_in_front_by_default():
  vocab = text.Vocabulary(["a", "b", "c", "d", "e"], size=10)  # a=2 ... e=6
  tok = text.Tokenize(vocab, "text", "label", max_len=4, num_stages=3)
  example = tok({"text": b"a b c d e", "label": np.int64(1)})
  np.testing.assert_array_equal(example["inputs"], [3, 4, 5, 6])  # the last 4 words
  assert example["inputs"].dtype == np.int32
  assert example["labels"] == (1.0, 1.0, 1.0) and example["labels"][0].dtype == np.float32
  np.testing.assert_array_equal(tok({"text": "a zz", "label": 0})["inputs"], [0, 0, 2, 1])
  np.testing.assert_array_equal(tok({"text": "", "label": 0})["inputs"], [0, 0, 0, 0])
  post = text.Tokenize(vocab, "text", "label", max_len=4, num_stages=1, padding="post", truncating="post")
  np.testing.assert_array_equal(post({"text": "a b c d e", "label": 0})["inputs"], [2, 3, 4, 5])
  np.testing.assert_array_equal(post({"text": "a zz", "label": 0})["inputs"], [2, 1, 0, 0])


# ------------------------------------------------------------------------------------------------
# synthetic_sentiment.
# ------------------------------------------------------------------------------------------------


def reference_label(sentence: bytes) -> int:
  """The documented rule, written independently: negators flip the sentiment word right after them."""
  tokens = sentence.decode().split()
  score = 0
  for i, word in enumerate(tokens):
    polarity = (word in text.POSITIVE_WORDS) - (word in text.NEGATIVE_WORDS)
    if i > 0 and tokens[i - 1] in text.NEGATORS:
      polarity = -polarity
    score += polarity
  assert score % 2, sentence  # an odd number of cues: no ties
  return int(score > 0)


def test_synthetic_sentiment_deterministic_balanced_and_follows_the_rule():
  train, evaluation = text.synthetic_sources(3, 2000, 500)
  again = text.synthetic_sentences(3, 2000, stream=0)
  texts = [train[i]["text"] for i in range(len(train))]
  labels = np.array([train[i]["label"] for i in range(len(train))])
  assert texts == list(again[0]) and np.array_equal(labels, again[1])
  assert texts != list(text.synthetic_sentences(4, 2000)[0])  # the seed matters
  assert not set(texts) & {evaluation[i]["text"] for i in range(len(evaluation))}
  assert 0.45 < labels.mean() < 0.55
  assert [reference_label(t) for t in texts] == labels.tolist()
  negated = sum(any(f"{n} {w}" in t.decode() for n in text.NEGATORS for w in text.POSITIVE_WORDS)
                for t in texts)
  assert negated > 200  # negation is common enough that word counts alone cannot give the label
  assert len(set(text.FILLER_WORDS)) == len(text.FILLER_WORDS) >= 200
  assert not set(text.FILLER_WORDS) & set(text.POSITIVE_WORDS + text.NEGATIVE_WORDS + text.NEGATORS)


def test_synthetic_task_batches():
  config = text_config(max_len=40)
  task = text.text_task(config, None)
  assert (task.input_shape, task.input_dtype, task.train_size, task.eval_size) == ((40,), np.int32, 400, 64)
  assert task.label_specs == (base.LabelSpec("sentiment"),) * 2
  batch = next(task.train_iterator(8, base.Shard()))
  assert batch["inputs"].shape == (8, 40) and batch["inputs"].dtype == np.int32
  assert len(batch["labels"]) == 2 and batch["labels"][1].shape == (8,)
  assert set(np.unique(batch["labels"][1])) <= {0.0, 1.0}
  assert (batch["inputs"][:, -1] > 1).all()  # padded in front; every sentence ends in a known word
  eval_rows = sum(int(b["mask"].sum()) for b in task.eval_iterator(16, base.Shard()))
  assert eval_rows == 64


# ------------------------------------------------------------------------------------------------
# The vocabulary in the workdir.
# ------------------------------------------------------------------------------------------------


def test_vocabulary_is_saved_in_the_workdir_and_reused(tmp_path):
  first = text.text_task(text_config(seed=0), str(tmp_path))
  assert not (tmp_path / text.VOCAB_FILE).exists()  # validation writes nothing ...
  first.save(str(tmp_path))  # ... training saves it
  saved = text.Vocabulary.load(tmp_path / text.VOCAB_FILE)
  assert saved == first.transform.vocab and len(saved.words) > 200
  other = text_config(seed=1, train_size=300)  # different training data ...
  assert text.text_task(other, None).transform.vocab != saved  # ... would give another vocabulary,
  assert text.text_task(other, str(tmp_path)).transform.vocab == saved  # but the workdir's is used


def test_vocabulary_size_mismatch_is_one_line_naming_the_field(tmp_path):
  text.text_task(text_config(), str(tmp_path)).save(str(tmp_path))
  with pytest.raises(DataError) as err:
    text.text_task(text_config(vocab_size=1000), str(tmp_path))
  message = str(err.value)
  assert "\n" not in message and message.startswith("config.data.vocab_size:")
  assert str(tmp_path / text.VOCAB_FILE) in message and "20000" in message


def test_vocab_size_larger_than_the_embedding_table_is_an_error():
  config = text_config()
  config.chain.stages[0].vocab_size = 100
  with pytest.raises(DataError, match=r"^config.data.vocab_size: .*chain.stages\[0\]"):
    text.text_task(config, None)


# ------------------------------------------------------------------------------------------------
# TFDS text datasets, through tfds.data_source.
# ------------------------------------------------------------------------------------------------


def write_metadata(data_dir, name, splits):
  """Writes the dataset_info.json/features.json of `name` with `splits` ({split: num_examples}) into data_dir.

  `tfds.testing.mock_data` mocks `tfds.data_source` (`as_data_source`) as well as
  `as_dataset`, but with its default policy (no metadata in the pip package:
  MockPolicy.USE_CODE) a builder is not prepared and has no split info, which our
  `open_builder`/`open_split` check. With MockPolicy.USE_FILES it reads the real
  metadata from `data_dir` and only fakes the records, so these files are all a
  "prepared" dataset needs; the records themselves are random text and 0/1 labels.
  """
  if name.startswith("glue/"):
    import tensorflow_datasets.text.glue  # pylint: disable=unused-import

  builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0, filename_template=tfds.core.ShardedFileTemplate(
          data_dir=builder.data_path, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
          dataset_name=builder.name, split=split, filetype_suffix="array_record"))
      for split, n in splits.items()]))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


def _mock_getitems(*args, generator, serialized=False):
  """`record_keys -> records` of the fake generator, called bound (self, keys) or unbound (keys)."""
  del serialized
  return [generator[key] for key in args[-1]]


@contextlib.contextmanager
def mock_tfds(data_dir, num_examples):
  """`tfds.testing.mock_data` over the metadata in `data_dir`, `num_examples` random records per split.

  TFDS 4.9.10's mock sets the fake source's `__getitems__` (the batched read Grain
  uses) as a plain attribute holding a partial that expects `self`, so a call
  fails with a missing argument; `_mock_getitems` accepts both ways.
  """
  with mock.patch.object(tfds_mocking, "_getitems", _mock_getitems), tfds.testing.mock_data(
      num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir):
    yield


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  write_metadata(data_dir, "imdb_reviews", {"train": 25000, "test": 25000, "unsupervised": 50000})
  write_metadata(data_dir, "glue/sst2", {"train": 67349, "validation": 872, "test": 1821})
  return str(data_dir)


@pytest.mark.parametrize("name,split_eval", [("imdb_reviews", "test"), ("glue/sst2", "validation")])
def test_tfds_text_dataset(tfds_dir, tmp_path, name, split_eval):
  config = text_config(name, data_dir=tfds_dir, split_eval=split_eval)
  with mock_tfds(tfds_dir, num_examples=40):
    task = text.text_task(config, str(tmp_path))
    task.save(str(tmp_path))
    batch = next(task.train_iterator(8, base.Shard()))
    eval_batches = list(task.eval_iterator(16, base.Shard()))
  assert (task.name, task.train_size, task.eval_size) == (name, 40, 40)
  assert batch["inputs"].shape == (8, 16) and batch["inputs"].dtype == np.int32
  assert set(np.unique(batch["labels"][0])) <= {0.0, 1.0}
  assert sum(int(b["mask"].sum()) for b in eval_batches) == 40
  vocab = text.Vocabulary.load(tmp_path / text.VOCAB_FILE)
  assert vocab == task.transform.vocab and vocab.words
  assert all(set(w) <= set("abcdefghij") for w in vocab.words)  # the mock's random words
  assert (batch["inputs"] > text.OOV_ID).any()


def test_imdb_reviews_from_real_array_record_files(tmp_path):
  """No mock: a tiny imdb_reviews prepared by TFDS itself (ArrayRecord, no TensorFlow), read back as bytes."""
  from tensorflow_datasets.datasets.imdb_reviews import imdb_reviews_dataset_builder as imdb

  reviews = {"train": ["A great film.<br /><br />Great!", "Awful, awful film", "great cast"] * 4,
             "test": ["great", "awful plot"]}

  with tfds.core.registered.skip_registration():

    class TinyImdb(imdb.Builder):
      name = "imdb_reviews"
      __module__ = imdb.Builder.__module__

      def _split_generators(self, dl_manager):
        return {split: self._examples(split) for split in reviews}

      def _examples(self, split):  # pylint: disable=arguments-renamed
        for i, review in enumerate(reviews[split]):
          yield i, {"text": review, "label": int("great" in review.lower())}

  data_dir = str(tmp_path / "tfds")
  TinyImdb(data_dir=data_dir, config="plain_text", file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  task = text.text_task(text_config("imdb_reviews", data_dir=data_dir, vocab_size=5, max_len=4), None)
  assert task.transform.vocab.words == ("great", "awful", "film")  # great 12, then awful and film 8 each
  assert (task.train_size, task.eval_size) == (12, 2)
  batch = next(task.eval_iterator(16, base.Shard()))
  rows = {(tuple(x), float(y)) for x, y in zip(batch["inputs"][:2].tolist(), batch["labels"][1][:2])}
  assert rows == {((0, 0, 0, 2), 1.0), ((0, 0, 3, 1), 0.0)}  # TFDS stores records in its own (hashed) order


@pytest.mark.parametrize("field,split,expected", [
    ("split_eval", "test", "split 'test' of glue/sst2 has no labels; use one of: train, validation"),
    ("split_eval", "nope", "'nope' is not a split of glue"),
    ("split_train", "", "is empty"),
])
def test_tfds_bad_split_is_one_line_naming_the_field(tfds_dir, field, split, expected):
  config = text_config("glue/sst2", data_dir=tfds_dir, split_eval="validation")
  config.data[field] = split
  with mock_tfds(tfds_dir, num_examples=4):
    with pytest.raises(DataError) as err:
      text.text_task(config, None)
  message = str(err.value)
  assert "\n" not in message and message.startswith(f"config.data.{field}:") and expected in message


# ------------------------------------------------------------------------------------------------
# The configs.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,arg,num_stages", [("imdb_lstm", "runlocal", 3), ("text_transformer", "runlocal", 3)])
def test_text_configs_build_and_train(name, arg, num_stages):
  config = helpers.load_config(name, arg, **{"data.train_size": 256})
  assert config.data.name == "synthetic_sentiment"
  task = text.text_task(config, None)
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = next(task.train_iterator(config.batch_size, base.Shard()))

  def loss_fn(params):
    out = nnx.merge(graphdef, params, rest)(batch["inputs"], train=True, key=jax.random.key(0))
    assert len(out.predictions) == num_stages and out.predictions[-1].shape == (config.batch_size,)
    logits = out.predictions[-1]
    return jax.numpy.mean(jax.nn.softplus(logits) - batch["labels"][-1] * logits)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert np.isfinite(float(loss))
  grad_sums = {}
  for path, g in jax.tree.leaves_with_path(nnx.to_pure_dict(grads)):
    stage = path[1].key
    grad_sums[stage] = grad_sums.get(stage, 0.0) + float(jax.numpy.abs(g).sum())
  assert set(grad_sums) == {s.name for s in config.chain.stages}
  assert all(v > 0 for v in grad_sums.values())  # every stage, the embedding included, gets a gradient


@pytest.mark.parametrize("name,arg", [("imdb_lstm", "data=synthetic"), ("imdb_lstm", "data=synthetic,aux"),
                                      ("imdb_lstm", "runlocal"), ("text_transformer", ""),
                                      ("text_transformer", "aux"), ("text_transformer", "runlocal")])
def test_text_configs_validate(name, arg):
  task = experiment.validate(helpers.load_config(name, arg), num_devices=8)
  assert task.name == "synthetic_sentiment" and task.label_specs[-1].is_binary


def test_imdb_lstm_config_is_the_documents_recipe():
  config = helpers.load_config("imdb_lstm")
  assert (config.data.name, config.data.vocab_size, config.data.max_len) == ("imdb_reviews", 20000, 256)
  assert (config.batch_size, config.num_epochs, config.total_steps) == (16, 20, 0)
  assert (config.optim.optimizer, config.optim.learning_rate, config.optim.schedule,
          config.optim.decay_rate) == ("adam", 2e-5, "exponential_per_epoch", 0.1)
  assert (config.early_stopping.metric, config.early_stopping.mode, config.early_stopping.patience) == (
      "eval/auc", "max", 2)
  assert [(s.type, s.head.enabled) for s in config.chain.stages] == [
      ("embedding", False), ("lstm", False), ("mlp", True)]


def test_a_split_whose_records_have_no_label_is_an_error():
  config = text_config("imdb_reviews")
  unlabeled = pipeline.ArraySource(text=np.array([b"a b"], object), label=np.array([-1]))
  with pytest.raises(DataError, match=r"^config.data.split_eval: record 0 of imdb_reviews split 'test' has label -1"):
    text._check_first_label(config.data, "split_eval", unlabeled, "label")  # pylint: disable=protected-access


def test_lstm_config_trains_with_the_exact_eval_auc_epoch_lines_and_the_vocab_in_the_workdir(tmp_path, caplog):
  import logging

  from chainjax import metrics
  from chainjax import train

  caplog.set_level(logging.INFO)
  config = helpers.load_config("imdb_lstm", "runlocal", num_epochs=2, **{"data.train_size": 256})
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 32  # 2 epochs of 256 // 16
  vocab = text.Vocabulary.load(tmp_path / text.VOCAB_FILE)
  assert vocab == text.text_task(config, None).transform.vocab
  assert final["eval/auc"] == final["eval/stage_3/auc"] == pytest.approx(_auc_of_saved_model(config, tmp_path),
                                                                          abs=1e-9)
  assert 0.0 <= final["train/auc"] <= 1.0
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch ")]
  assert len(lines) == 2 and lines[1].startswith("Epoch 2/2 - ")
  assert " - auc: " in lines[1] and " - val_auc: " in lines[1]
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [16, 32]


def _auc_of_saved_model(config, workdir) -> float:
  """The ROC AUC of the final checkpoint's logits over the whole eval set, by counting every
  (positive, negative) pair: what `eval/auc` must equal (not an average of per-batch AUCs)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from chainjax import chain as chain_lib
  from chainjax import data as data_lib
  from chainjax.data import base

  task = data_lib.get_task(config, str(workdir))
  graphdef, params, rest = nnx.split(chain_lib.build_chain(config, task, rngs=nnx.Rngs(0)), nnx.Param, ...)
  saved = jax.tree.leaves(helpers.final_state(workdir)["tree"]["params"])  # same leaf order, {"value": x} nodes
  nnx.replace_by_pure_dict(params, jax.tree.unflatten(jax.tree.structure(nnx.to_pure_dict(params)), saved))
  model = nnx.merge(graphdef, params, rest)
  batches = list(task.eval_iterator(config.eval_batch_size, base.Shard()))
  scores = np.concatenate([np.asarray(model(jnp.asarray(b["inputs"])).predictions[-1]).ravel() for b in batches])
  labels = np.concatenate([b["labels"][-1] for b in batches]).ravel() > 0.5
  real = np.concatenate([b["mask"] for b in batches]) > 0
  pos, neg = scores[real & labels], scores[real & ~labels]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return float(wins / (len(pos) * len(neg)))
