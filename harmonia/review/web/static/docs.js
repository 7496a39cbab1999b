// Starts Swagger UI on /docs (a file, not inline code, so the content security policy holds).
window.addEventListener("load", () => {
  const el = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({ url: el.dataset.openapi, dom_id: "#swagger-ui" });
});
