"""The model side: loading (``loading``), decoder blocks (``blocks``), the trained
parameter sets (``params``: full, lora, prefix, template; ``template``: the template
tail), batched scoring and greedy decoding (``inference``), the KV-cache and batching
helpers they share (``kv``), and the two fast paths (``prefix``: the frozen lower
blocks computed once per step; ``tail_probes``: a template tail's probes together).
"""
