"""The demo: a synthetic miniature world (`world`), a tiny VLM captioner the project trains
itself (`captioner`), and the whole recipe run end to end on them."""

