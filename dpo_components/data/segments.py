"""What each position of a prefix-shared or packed row holds, as the collators write it (``batch["segments"]``) and
the attention masks read it (``dpo_components.models.attention_masks``, ``.document_attention``):

    PROMPT    the pair's prompt, which both responses see
    CHOSEN    the first response of a document (the chosen one; a KTO row's completion)
    REJECTED  the second response (the rejected one), whose positions restart after the prompt
    PADDING   nothing: padding sees only earlier padding, and no token sees it
"""

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3
