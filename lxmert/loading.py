"""LXMERT's model and tokenizer (HuggingFace transformers, imported only here, lazily), from a
folder or a hub name, every failure one line."""

import os

from utils.errors import CheckpointError, OptionError, VSRNError, first_line
from utils.hub import hub_offline, hub_unavailable

MODES = ("matched", "cosine")
DEFAULT_MODEL = "unc-nlp/lxmert-base-uncased"


def import_transformers():
    """The transformers package, or a one-line VSRNError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise VSRNError("LXMERT needs the transformers package: python3 -m pip install transformers") from None
    return transformers


def check_mode(mode):
    if mode not in MODES:
        raise OptionError.naming("{mode} {value}: expected one of {modes}", value=mode, modes=", ".join(MODES))


def load_lxmert(model_path, mode, tokenizer_path=None):
    """(model in eval mode, tokenizer) from a local directory or a hub name; one-line errors naming the request's
    fields `model`, `mode` and `tokenizer`."""
    check_mode(mode)
    local_only = hub_unavailable(model_path, "model")  # before transformers' import, which takes seconds
    transformers = import_transformers()
    config = _from_pretrained(
        transformers.PretrainedConfig.get_config_dict, model_path, "model", local_only, "its config.json"
    )[0]
    check_model_type(config, model_path)
    model_class = transformers.LxmertForPreTraining if mode == "matched" else transformers.LxmertModel
    model, info = _from_pretrained(
        model_class.from_pretrained, model_path, "model", local_only, "LXMERT's weights", output_loading_info=True
    )
    missing = sorted(info.get("missing_keys", ()))
    if mode == "matched":
        if any(key.startswith("cls.seq_relationship.") for key in missing):
            raise CheckpointError.naming(
                "{model} {path}: no image-text matching head (cls.seq_relationship) in its weights; "
                "{mode} matched needs LXMERT's pretraining checkpoint (e.g. unc-nlp/lxmert-base-uncased); "
                "{mode} cosine needs only the backbone",
                path=model_path,
            )
        missing = [key for key in missing if key.startswith("lxmert.")]
    if missing:
        raise CheckpointError.naming(
            "{model} {path}: {count} LXMERT weights missing (e.g. {key})",
            path=model_path,
            count=len(missing),
            key=missing[0],
        )
    if tokenizer_path is None:
        tokenizer = load_tokenizer(model_path, model.config.vocab_size, "model", local_only)
    else:
        tokenizer = load_tokenizer(tokenizer_path, model.config.vocab_size)
    return model.eval(), tokenizer


def check_model_type(config, model_path):
    """Refuse a config.json (as a dict) that names another model than LXMERT.

    transformers would build an LXMERT from any config, ignoring its model_type, and then
    report missing weights. A config naming neither a model type nor architectures passes.
    """
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type is not None and model_type != "lxmert":
        raise CheckpointError.naming(
            "{model} {path}: a {kind} model (config.json), not LXMERT", path=model_path, kind=model_type
        )
    if model_type is None and architectures and not any(name.startswith("Lxmert") for name in architectures):
        raise CheckpointError.naming(
            "{model} {path}: a {kind} model (config.json), not LXMERT", path=model_path, kind=architectures[0]
        )


def _from_pretrained(load, value, field, local_only, what, **kwargs):
    """`load(value, ...)` of transformers (loading `what`, named by the request's `field`) with its failures as
    one line; no hub request when `local_only`."""
    transformers = import_transformers()
    verbosity, progress_bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # what the caller checks, it reports in one line
    transformers.logging.disable_progress_bar()
    try:
        return load(value, local_files_only=local_only, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        named = f"{{{field}}} {{value}}"
        if os.path.isdir(value):
            raise CheckpointError.naming(
                named + ": cannot load {what} from this folder ({why})", value=value, what=what, why=first_line(e)
            ) from None
        if local_only:
            why = "HF_HUB_OFFLINE is set" if hub_offline() else "the model hub cannot be reached"
            raise CheckpointError.naming(
                named + ": no such folder, and not in the hub's cache ({why}); download the weights into a folder "
                "and pass that (see docs/lxmert.md)",
                value=value,
                why=why,
            ) from None
        raise CheckpointError.naming(
            named + ": no such folder, and the model hub cannot provide it ({why})", value=value, why=first_line(e)
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress_bars:
            transformers.logging.enable_progress_bar()


def load_tokenizer(path, vocab_size, field="tokenizer", local_only=None):
    """LXMERT's tokenizer from a folder or a hub name, given as the request's `field` (`local_only` as
    `hub_unavailable` decides by default)."""
    transformers = import_transformers()
    if local_only is None:
        local_only = hub_unavailable(path, field)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.txt", "tokenizer.json")):
        raise CheckpointError.naming(
            "{path}: no tokenizer (vocab.txt or tokenizer.json); save LXMERT's tokenizer there or pass {tokenizer}",
            path=path,
        )
    # transformers 4.x has a Rust-backed LxmertTokenizerFast; in 5.x LxmertTokenizer is that one.
    tokenizer_class = getattr(transformers, "LxmertTokenizerFast", None) or transformers.LxmertTokenizer
    tokenizer = _from_pretrained(tokenizer_class.from_pretrained, path, field, local_only, "LXMERT's tokenizer")
    # transformers 5 builds an empty word-piece vocabulary when it finds no vocabulary file.
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise CheckpointError.naming(
            "{path}: the tokenizer has no vocabulary (only special tokens); pass {tokenizer}", path=path
        )
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {vocab_size}"
        )
    return tokenizer
