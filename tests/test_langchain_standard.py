"""langchain-tests' ChatModelIntegrationTests on ChatInfoFlow over the embedded SmolLM2-135M (marked: run with
-m real_model), and with_structured_output returning a validated instance on that model."""

from __future__ import annotations

import pytest
from langchain_infoflow import ChatInfoFlow
from langchain_tests.integration_tests import ChatModelIntegrationTests
from pydantic import BaseModel, Field

from infoflow_rag.engine import Engine
from infoflow_rag.pipeline import Pipeline
from infoflow_rag.store import open_store

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm_pipeline() -> Pipeline:
    return Pipeline(Engine.load("smollm2-135m"), open_store("memory"))


class TestChatInfoFlowIntegration(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _use_pipeline(self, smollm_pipeline: Pipeline) -> None:
        self.smollm_pipeline = smollm_pipeline

    @property
    def chat_model_class(self) -> type[ChatInfoFlow]:
        return ChatInfoFlow

    @property
    def chat_model_params(self) -> dict:
        return {"pipeline": self.smollm_pipeline, "max_tokens": MAX_TOKENS}

    @property
    def has_tool_calling(self) -> bool:
        return False  # bind_tools raises, naming with_structured_output

    @property
    def has_structured_output(self) -> bool:
        return True  # constrained decoding, every method

    @property
    def supports_json_mode(self) -> bool:
        return True  # method="json_mode" is the same constrained decoding

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one ChatInfoFlow serves the one model its pipeline loaded


MAX_TOKENS = (
    32  # every call decodes up to this many tokens: it sets the tier's time (structured output is finished within it)
)


class City(BaseModel):
    """A city and the country it is in."""

    city: str = Field(description="the city's name")
    country: str = Field(description="the country it is in")
    population_millions: int = Field(description="population, in millions")


def test_with_structured_output_returns_a_validated_instance_on_the_default_model(smollm_pipeline):
    llm = ChatInfoFlow(pipeline=smollm_pipeline, max_tokens=40)
    city = llm.with_structured_output(City).invoke("What is the capital of France? Answer as JSON.")
    assert isinstance(city, City) and city.city.strip()  # measured: City(city='Paris', country='FRANCE', ...)
