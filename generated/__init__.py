"""Code generated from proto/ by scripts/gen_proto.sh: never edited by hand."""
