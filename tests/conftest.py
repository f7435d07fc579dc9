"""Test setup: 8 fake CPU devices for sharding tests (set before jax is imported)."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
  import torch  # a pinned test requirement: imported, never optional

  torch.set_num_threads(2)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
  """tests.test_tokenizer's tiny byte-level BPE tokenizer, built once per session (read-only:
  nothing may save into it)."""
  from tests.test_tokenizer import tiny_tokenizer_dir

  return tiny_tokenizer_dir(tmp_path_factory.mktemp("bpe_tokenizer"))


@pytest.fixture(scope="session")
def bpe_tokenizer(bpe_tokenizer_dir):
  from tests import text_tokenizers

  return text_tokenizers.from_dir(bpe_tokenizer_dir)


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tokenizer(request):
  """The byte tokenizer and the BPE one (tests/text_tokenizers.py), test ids `byte` / `bpe`.
  Module scope, so that tests are regrouped by tokenizer within their module only; a test
  narrows it with `@pytest.mark.parametrize("tokenizer", ["byte"], indirect=True)`."""
  from tests import text_tokenizers

  if request.param == "byte":
    return text_tokenizers.byte()
  return request.getfixturevalue("bpe_tokenizer")
