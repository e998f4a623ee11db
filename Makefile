# The two entry points README documents. Each sets up .venv on its own (scripts/setup_venv.sh).
PY := .venv/bin/python
KILN := .venv/bin/kiln
OUT ?= out
PROMPT ?= What is the capital of France?

.PHONY: demo test setup clean

# Main job on the built-in model: convert SmolLM2-135M-Instruct (GGUF) to a checkpoint, inspect it,
# run it, quantize it to FP8 (calibrated, quality-gated), build an engine of that for this machine
# (its GPU, or the CPU) and run the engine.
demo:
	@scripts/setup_venv.sh
	$(KILN) convert builtin:smollm2-135m -o $(OUT)/smollm2-135m --force
	$(KILN) inspect $(OUT)/smollm2-135m --verify
	$(KILN) run $(OUT)/smollm2-135m --prompt "$(PROMPT)" --max-tokens 48
	$(KILN) quantize $(OUT)/smollm2-135m -o $(OUT)/smollm2-135m-fp8 --format fp8 --calib-size 8 --eval-windows 2 --force
	$(KILN) build $(OUT)/smollm2-135m-fp8 -o $(OUT)/smollm2-135m-fp8-engine --max-seq-len 2048 --force
	$(KILN) run $(OUT)/smollm2-135m-fp8-engine --prompt "$(PROMPT)" --max-tokens 48

# The test suite (CPU; GPU tests skip without CUDA).
test:
	@scripts/setup_venv.sh test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf .venv $(OUT) .pytest_cache
