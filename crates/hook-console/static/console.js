// The console's only script, a convenience: "select all" ticks every event checkbox.
document.addEventListener("change", (e) => {
  if (e.target.id !== "select-all") return;
  for (const box of document.querySelectorAll('input[name="id"]')) box.checked = e.target.checked;
});
