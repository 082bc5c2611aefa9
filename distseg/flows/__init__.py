"""What a user does with a trained run: score it (`evaluate`), write official results (`predict`), export it
for serving (`export`). Each opens a run through `runs`, reads images through `data` and runs them through the
one inference path; imports nothing from training, reporting or the commands."""
