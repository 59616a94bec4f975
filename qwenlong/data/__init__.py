"""DocQA data: records, loaders, the method's prompt, token budgets, synthetic documents."""

from qwenlong.data.loaders import (
    DataError,
    LoadResult,
    load_records,
    record_from_verl_row,
    to_verl_row,
    write_jsonl,
    write_parquet,
)
from qwenlong.data.prompt import (
    FORMAT_INSTRUCTION,
    apply_chat_template,
    build_prompt,
    extract_question,
    record_prompt,
    split_prompt,
)
from qwenlong.data.records import DocQARecord, record_from_mapping
from qwenlong.data.synthetic import (
    SyntheticConfig,
    generate_records,
    make_record,
    reference_response,
    teacher_response,
)
from qwenlong.data.tokenizers import load_qwen_tokenizer, train_demo_tokenizer
from qwenlong.data.tokens import (
    FittedPrompt,
    count_tokens,
    fit_prompt,
    fit_prompt_report,
    truncate_middle,
    truncate_middle_ids,
)

__all__ = [
    "DataError",
    "DocQARecord", "FORMAT_INSTRUCTION", "FittedPrompt", "LoadResult", "SyntheticConfig", "apply_chat_template",
    "build_prompt", "count_tokens", "extract_question", "fit_prompt", "fit_prompt_report", "generate_records",
    "load_qwen_tokenizer", "load_records", "make_record", "record_from_mapping", "record_from_verl_row",
    "record_prompt", "reference_response", "split_prompt", "teacher_response", "to_verl_row", "train_demo_tokenizer",
    "truncate_middle", "truncate_middle_ids", "write_jsonl", "write_parquet",
]
