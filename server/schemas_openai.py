"""Models of the OpenAI-compatible Images API (`POST /v1/images/generations`), shaped like OpenAI's own so the
official `openai` client works unchanged; IRG's own knobs (mode, rounds, steps, seed, thinking, guidance) are
accepted too (the client's `extra_body`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from server.schemas import GenerationOptions, Prompt


class ImageGenerationRequest(GenerationOptions):
    prompt: Prompt
    model: str | None = Field(None, max_length=256, description="accepted and ignored: this server runs one model")
    n: int | None = Field(
        1,
        description="images to generate, 1 to IRG_MAX_IMAGES (4 unless set; 10 at most): one "
        "job each, seeds seed, seed+1 ...",
    )
    size: str | None = Field(
        "auto", pattern=r"^(auto|\d{1,5}x\d{1,5})$", description="WIDTHxHEIGHT, multiples of 16 (auto: 1024x1024)"
    )
    response_format: Literal["b64_json", "url"] | None = Field(None, description="default b64_json")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="default png")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality (default 100)")
    stream: bool | None = Field(False, description="SSE: image_generation.partial_image (drafts), .completed")
    partial_images: int | None = Field(
        None,
        ge=0,
        le=3,
        description=(
            "partial images to stream at most: the drafts (default: up to 3); a number above the drafts also fills the "
            "free slots with live previews of the image being drawn"
        ),
    )
    background: Literal["auto", "opaque", "transparent"] | None = Field(None, description="transparent: unsupported")
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = Field(
        None, description="accepted and ignored (use steps)"
    )
    moderation: Literal["low", "auto"] | None = Field(None, description="accepted and ignored")
    style: Literal["vivid", "natural"] | None = Field(None, description="accepted and ignored")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    safety_identifier: str | None = Field(None, max_length=256, description="accepted and ignored")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = Field(None, description="the last thought: the final reflection's improvement plan")


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class ImageUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: Literal["auto"] = "auto"
    size: str
    usage: ImageUsage | None = None
