"""`shardwise train`: every check made before any rank is spawned, then the training run on every rank."""

from __future__ import annotations

import logging
from pathlib import Path

from ..io.publish import check_target
from ..launch import launch
from ..model.text import Text
from ..plan.spec import load_spec
from ..words import plural
from .args import _checkpoint_dir, _layout, _plan_everywhere, _provide, _report, _world

log = logging.getLogger("shardwise")


def _check_train(args):
    """Every mistake a train job could make, found before any rank is spawned; the token stream it trains on, and
    with --resume the saved record."""
    from ..train.data import TokenStream, check_batching, thin_text, tokenize_file
    from ..train.run import check_log, same_directory
    from ..train.state import Record, base_dtype
    from ..train.step import TRAINABLE

    if args.pp > 1 and args.train == "prompt-table":
        raise ValueError(f"--pp {args.pp}: prompt tuning runs on one pipeline stage; use --pp 1")
    if args.provider not in TRAINABLE:
        raise ValueError(f"--provider {args.provider}: training runs on {' or '.join(TRAINABLE)}")
    if args.series:
        raise ValueError("--series declares layers of --provider series, which training does not run on")
    _provide(args)
    spec = _plan_everywhere(args.checkpoint, _layout(args), args.provider)
    if args.pp > 1 and spec.aux_loss_coef and spec.sparse:
        raise ValueError(f"--pp {args.pp}: {args.checkpoint}'s balancing loss (config.json's router_aux_loss_coef "
                         "with output_router_logits) counts every layer's expert choices at once, which pipeline "
                         "stages do not share; use --pp 1")
    if args.resume:
        _checkpoint_dir(args.resume, "--resume")
    in_place = same_directory(args.resume, args.save)  # each save replaces RUN, vetted below as this run's
    others = [args.resume] if args.resume and not in_place else []
    check_target(args.save, args.overwrite or in_place, [args.checkpoint, *others],
                 "table" if args.train == "prompt-table" else "model")
    if args.log:
        check_log(args.log, args.checkpoint, args.train == "prompt-table")
    check_batching(args.batch, args.dp, args.accumulate)
    ids = tokenize_file(args.checkpoint, args.data)
    stream = TokenStream.from_ids(ids, args.seq, args.batch, args.seed, args.data)
    for warning in thin_text(args.data, len(ids), args.seq, args.batch):
        log.warning("%s", warning)
    if int(stream.windows.max()) >= spec.vocab:
        raise ValueError(f"{args.data}: token id {int(stream.windows.max())}, but the model's vocabulary has "
                         f"{spec.vocab} (tokenizer and model disagree)")
    if args.train == "prompt-table":
        return stream, _check_prompt_resume(args, spec, stream)
    for flag in ("virtual_tokens", "task", "init_text"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} goes with --train prompt-table")
    if args.resume:
        shapes = {name: info.shape for name, info in spec.tensors().items()}
        saved = {name: info.shape for name, info in load_spec(args.resume).tensors().items()}
        if saved != shapes:
            raise ValueError(f"--resume {args.resume}: its config.json describes another model than "
                             f"{args.checkpoint}'s ({len(saved)} tensors against {len(shapes)}, or other shapes)")
        record = Record.read(args.resume)
        record.check_resumable(args.resume, stream, args.steps)
        return stream, record
    base_dtype(args.checkpoint)  # the dtype the saves record (a training checkpoint's, from its record: vetted)
    return stream, None


def _check_prompt_resume(args, spec, stream):
    """With --resume, the prompt table saved there checked against the model, this run's data and its --virtual-tokens;
    its record. Else None, once --virtual-tokens is known to be given."""
    from ..io.prompt_table import table_shape
    from ..train.prompt_tuning import read_record, read_state

    if not args.resume:
        if args.virtual_tokens is None:
            raise ValueError("--train prompt-table needs --virtual-tokens N, the table's length")
        return None
    if args.init_text is not None:
        raise ValueError(f"--init-text starts a new table; --resume {args.resume} goes on from the one saved there")
    record = read_record(args.resume)
    virtual = table_shape(Path(args.resume), spec)
    if args.virtual_tokens not in (None, virtual):
        raise ValueError(f"--resume {args.resume}: its table has {virtual} virtual tokens, not --virtual-tokens "
                         f"{args.virtual_tokens}")
    read_state(Path(args.resume), (0, virtual), virtual, spec.hidden)
    record.check_resumable(args.resume, stream, args.steps)
    return record


def _prompt_args(args, spec, record):
    """What --train prompt-table trains: the task (by default a resumed run's, else the --save directory's name),
    the ids its table starts from, and what PEFT's adapter config says of it (a resume keeps the start its table's
    config records, if it is one PEFT knows)."""
    from ..io.prompt_table import CONFIG, read_json
    from ..train.prompt_tuning import init_ids
    from ..train.run import PromptArgs

    saved_task = record.settings.get("task") if record is not None else None
    task = args.task or (saved_task if isinstance(saved_task, str) and saved_task else Path(args.save).name)
    base = str(Path(args.checkpoint).resolve())
    config = {"base_model_name_or_path": base, "num_layers": spec.layers, "num_attention_heads": spec.heads}
    if args.resume:
        saved = read_json(Path(args.resume), CONFIG, "PEFT adapter config")
        init = saved.get("prompt_tuning_init")
        if init == "TEXT" and isinstance(saved.get("prompt_tuning_init_text"), str):
            config |= {"prompt_tuning_init": init, "prompt_tuning_init_text": saved["prompt_tuning_init_text"],
                       "tokenizer_name_or_path": base}
        elif init in ("SAMPLE_VOCAB", "RANDOM"):
            config |= {"prompt_tuning_init": init}
        return PromptArgs(task, (), config)
    if args.init_text is None:
        return PromptArgs(task, tuple(init_ids(args.virtual_tokens, spec.vocab, seed=args.seed)),
                          config | {"prompt_tuning_init": "SAMPLE_VOCAB"})
    ids = Text(args.checkpoint).encode(args.init_text)
    if not ids or max(ids) >= spec.vocab:
        raise ValueError(f"--init-text {args.init_text!r}: {'token id ' + str(max(ids)) if ids else 'no tokens'}, "
                         f"expected tokens of the model's vocabulary of {spec.vocab}")
    return PromptArgs(task, tuple(init_ids(args.virtual_tokens, spec.vocab, ids)),
                      config | {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": args.init_text,
                                "tokenizer_name_or_path": base})


def cmd_train(args) -> None:
    from ..train.run import TrainArgs, settings, train_rank

    stream, record = _check_train(args)
    prompt = _prompt_args(args, load_spec(args.checkpoint), record) if args.train == "prompt-table" else None
    job = TrainArgs(args.checkpoint, _layout(args), _provide(args), stream, args.steps, args.lr, args.save,
                    args.warmup, args.schedule, args.weight_decay, args.clip or None, args.accumulate,
                    args.save_every, args.overwrite, args.log, args.resume, prompt)
    if record is not None and record.changed(settings(job)):
        log.warning("--resume %s: this run changes %s (steps %d on follow this run's settings, not the saved run's)",
                    args.resume, ", ".join(record.changed(settings(job))), record.step + 1)
    result = launch(train_rank, _world(args), job)
    what = "" if prompt is None else (f" a prompt table of {plural(result['virtual'], 'virtual token')} for task "
                                      f"{prompt.task!r} (the model frozen),")
    _report(f"trained{what} steps {result['first_step']}..{result['steps']} on "
            f"{plural(len(stream.windows), 'window')} of {args.seq} tokens ({_layout(args)}, {args.provider}): loss "
            f"{result['first_loss']:.4f} -> {result['last_loss']:.4f}; saved {args.save}")
