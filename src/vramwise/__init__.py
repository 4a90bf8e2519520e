"""vramwise: large language models on GPUs too small for them, served through an OpenAI-compatible API."""

from vramwise.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Importing the engine pulls in torch; keep `import vramwise` light for torch-free users.
    if name == "LLM":
        from vramwise.llm import LLM

        return LLM
    raise AttributeError(name)
