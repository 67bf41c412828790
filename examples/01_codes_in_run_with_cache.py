# %% [markdown]
# # Codes in `run_with_cache`
#
# test

# %%
print("hi")
